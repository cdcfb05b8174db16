"""Workloads for `pdserve bench serve`: random, shared-prefix, multi-turn and ShareGPT conversations.

Every dataset yields `Conversation`s. A single-turn request is a conversation of one turn; a
multi-turn one sends turn k+1 only after turn k's reply has come back, carrying that reply.
Prompts are kept as token ids where the dataset makes them (exact lengths) and as text where a
target needs text (chat endpoints, multi-turn HTTP); text is decoded with the tokenizer given.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TextCodec(Protocol):
    """What the datasets need from a tokenizer (services.engine.tokenizer.Tokenizer fits)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class LengthRange:
    """An inclusive token-count range, parsed from "N" or "A:B"."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"a length range needs 1 <= low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, spec: str) -> LengthRange:
        parts = spec.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"bad length {spec!r}: expected N or A:B with integers") from None
        if len(values) == 1:
            return cls(values[0], values[0])
        if len(values) == 2:
            return cls(values[0], values[1])
        raise ValueError(f"bad length {spec!r}: expected N or A:B")

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Segment:
    """A piece of prompt. `ids` is exact where the dataset made tokens; `text` is set when decoded or given."""

    num_tokens: int
    ids: tuple[int, ...] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.ids is None and self.text is None:
            raise ValueError("a segment needs token ids or text")


@dataclass(frozen=True)
class Turn:
    user: Segment
    output_len: int


@dataclass(frozen=True)
class Conversation:
    """One client's work: an optional system prompt, then turns answered in order."""

    turns: tuple[Turn, ...]
    system: Segment | None = None

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError("a conversation needs at least one turn")


@dataclass(frozen=True)
class TokenSpace:
    """Token ids a random prompt may use: [0, vocab_size) less `excluded` (special tokens)."""

    vocab_size: int
    excluded: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.vocab_size - len(self.excluded) < 2:
            raise ValueError(f"vocabulary of {self.vocab_size} leaves too few usable token ids")

    def sample(self, rng: random.Random, n: int) -> tuple[int, ...]:
        out: list[int] = []
        while len(out) < n:
            t = rng.randrange(self.vocab_size)
            if t not in self.excluded:
                out.append(t)
        return tuple(out)


def _segment(ids: tuple[int, ...], codec: TextCodec | None) -> Segment:
    return Segment(len(ids), ids, codec.decode(list(ids)) if codec is not None else None)


def random_dataset(n: int, input_len: LengthRange, output_len: LengthRange, space: TokenSpace, seed: int,
                   codec: TextCodec | None = None) -> list[Conversation]:
    """`n` single-turn requests of uniformly random lengths and random token ids."""
    rng = random.Random(seed)
    return [Conversation((Turn(_segment(space.sample(rng, input_len.sample(rng)), codec), output_len.sample(rng)),))
            for _ in range(n)]


def shared_prefix_dataset(num_groups: int, prompts_per_group: int, system_prompt_len: int, question_len: int,
                          output_len: LengthRange, space: TokenSpace, seed: int,
                          codec: TextCodec | None = None) -> list[Conversation]:
    """SGLang's generated-shared-prefix: groups of questions behind one long system prompt each, shuffled."""
    if num_groups < 1 or prompts_per_group < 1 or system_prompt_len < 1 or question_len < 1:
        raise ValueError("shared-prefix needs num_groups, prompts_per_group, system_prompt_len, question_len >= 1")
    rng = random.Random(seed)
    out: list[Conversation] = []
    for _ in range(num_groups):
        system = _segment(space.sample(rng, system_prompt_len), codec)
        for _ in range(prompts_per_group):
            question = _segment(space.sample(rng, question_len), codec)
            out.append(Conversation((Turn(question, output_len.sample(rng)),), system=system))
    rng.shuffle(out)
    return out


def multi_turn_dataset(num_conversations: int, turns: int, input_len: LengthRange, output_len: LengthRange,
                       space: TokenSpace, seed: int, codec: TextCodec | None = None) -> list[Conversation]:
    """Chat conversations of `turns` user messages each; every turn's prompt is the whole history so far."""
    if num_conversations < 1 or turns < 1:
        raise ValueError("multi-turn needs num_conversations >= 1 and turns >= 1")
    rng = random.Random(seed)
    return [Conversation(tuple(Turn(_segment(space.sample(rng, input_len.sample(rng)), codec), output_len.sample(rng))
                               for _ in range(turns)))
            for _ in range(num_conversations)]


def load_sharegpt(path: str | Path, n: int, codec: TextCodec, max_model_len: int, seed: int,
                  output_len: int | None = None) -> list[Conversation]:
    """The first human turn of each ShareGPT conversation as the prompt; the gpt reply's length as output length.

    Keeps pairs whose prompt and reply are at least 2 tokens and fit `max_model_len` together; samples `n`
    of them (all of them when fewer fit). `output_len` overrides the reply length.
    """
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"ShareGPT file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"ShareGPT file {path} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(f"ShareGPT file {path} must hold a JSON list of {{'conversations': [...]}} entries")
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if first.get("from") == "human" and second.get("from") == "gpt":
            prompt, reply = first.get("value"), second.get("value")
            if isinstance(prompt, str) and isinstance(reply, str):
                pairs.append((prompt, reply))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    out: list[Conversation] = []
    for prompt, reply in pairs:
        if len(out) == n:
            break
        prompt_len = len(codec.encode(prompt))
        reply_len = output_len or len(codec.encode(reply, add_special_tokens=False))
        if prompt_len < 2 or reply_len < 2 or prompt_len + reply_len > max_model_len:
            continue
        out.append(Conversation((Turn(Segment(prompt_len, None, prompt), reply_len),)))
    if not out:
        raise ValueError(f"no usable human/gpt pair in {path} fits a context of {max_model_len} tokens")
    return out


def num_requests(conversations: list[Conversation]) -> int:
    return sum(len(c.turns) for c in conversations)
