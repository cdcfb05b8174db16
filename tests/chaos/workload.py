"""The chaos suite's prompts and their reference answers.

Every request of the suite is greedy (temperature 0, ignore_eos) on a prompt of a fixed family, so
its right answer is known before any fault: the offline engine's (`services.engine.LLM`, itself checked
token for token against transformers by tests/engine/test_correctness.py) for the longest output its family asks;
a shorter output is a prefix of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

VOCAB_LOW, VOCAB_HIGH = 10, 7900  # ordinary tokens of the tiny preset (8192 ids, specials at the top)

Via = Literal["grpc", "http"]


@dataclass(frozen=True)
class Family:
    """Prompts for one use: a scenario that needs the prefill workers busy gets its own long prompts, which no
    earlier scenario has put in a prefix cache."""

    seed: int
    count: int
    min_len: int
    max_len: int
    max_out: int  # the longest output asked of these prompts

    @property
    def prompts(self) -> tuple[tuple[int, ...], ...]:
        rng = random.Random(self.seed)
        lengths = [rng.randint(self.min_len, self.max_len) for _ in range(self.count)]
        return tuple(tuple(rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)) for n in lengths)


FAMILIES: dict[str, Family] = {
    "short": Family(1, 8, 20, 100, 32),
    "medium": Family(2, 16, 150, 300, 96),
    "kill": Family(3, 8, 1000, 1400, 16),
    "stall": Family(4, 8, 1000, 1400, 16),
    "overload": Family(5, 4, 900, 1100, 64),
    "kv": Family(6, 16, 600, 900, 16),
}


def prompts(family: str) -> tuple[tuple[int, ...], ...]:
    return FAMILIES[family].prompts


@dataclass(frozen=True)
class Req:
    """One request a scenario sends: which prompt, how many tokens, over which API, within what deadline."""

    prompt: tuple[int, ...]
    max_tokens: int
    via: Via = "grpc"
    deadline_s: float = 60.0
    request_id: str = ""


class Reference:
    """The greedy answer to every prompt of every family, for up to its family's max_out tokens."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], texts: dict[tuple[int, ...], list[str]]) -> None:
        self.answers = answers
        self._texts = texts  # the decoded text of the first k tokens, k = 0..max_out

    def tokens(self, req: Req) -> list[int]:
        return self.answers[req.prompt][: req.max_tokens]

    def text(self, req: Req) -> str:
        return self._texts[req.prompt][req.max_tokens]

    @classmethod
    def compute(cls, model_dir: str, cache_dir: Path | None = None) -> Reference:
        """Runs the offline engine once per model and family (the answers kept in `cache_dir`)."""
        weights = sorted(Path(model_dir).glob("*.safetensors"))
        model_key = [str(model_dir), [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]]
        llm = None
        answers: list[list[int]] = []
        for family in FAMILIES.values():
            key = hashlib.sha256(json.dumps([model_key, dataclasses.astuple(family)]).encode()).hexdigest()[:16]
            cache = None if cache_dir is None else cache_dir / f"chaos-reference-{key}.json"
            if cache is not None and cache.is_file():
                answers += json.loads(cache.read_text())
                continue
            if llm is None:
                from services.engine import LLM

                llm = LLM(model_dir)
            from services.engine import SamplingParams

            params = SamplingParams(temperature=0, max_tokens=family.max_out, ignore_eos=True)
            got = [r.token_ids for r in llm.generate([list(p) for p in family.prompts], params, use_tqdm=False)]
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(got))
            answers += got
        return cls._build(model_dir, answers)

    @classmethod
    def _build(cls, model_dir: str, answers: list[list[int]]) -> Reference:
        from services.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer(model_dir)
        every = [p for family in FAMILIES.values() for p in family.prompts]
        by_prompt = dict(zip(every, answers, strict=True))
        texts = {p: [tokenizer.decode(a[:k]) for k in range(len(a) + 1)] for p, a in by_prompt.items()}
        return cls(by_prompt, texts)
