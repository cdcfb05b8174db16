"""The offline batch API: `LLM(model_dir).generate(prompts, sampling_params)`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from services.config_flags import from_options
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.errors import InvalidRequest
from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.engine.request import RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RequestOutput
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer

Prompt = str | list[int]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class CompletionOutput:
    """One of a prompt's params.n outputs."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when params.logprobs is set


@dataclass
class GenerationResult:
    """A prompt's outputs. token_ids, text and finish_reason are the first output's; usage counts the
    prompt once (its cached_tokens are the first output's hit) and the tokens of every output."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None  # set when the request was refused; the rest of the batch still runs
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # when params.prompt_logprobs is set


def prefix_groups(prompts: list[list[int]], block_size: int) -> list[list[int]]:
    """Indices grouped so that prompts sharing at least one full block of prefix run together.

    Sorting the token lists puts shared prefixes side by side (BatchLLM's global prefix
    sharing); each group's first member is its leader, whose prefill fills the prefix cache
    before the followers start.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            lead = prompts[groups[-1][0]]
            if len(lead) >= block_size and prompts[i][:block_size] == lead[:block_size]:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


class LLM:
    def __init__(self, model: str | None = None, **options: Any) -> None:
        """`model`: a Hugging Face model directory (default: the built-in tiny model, generated if missing).

        `options` are the fields of EngineConfig, CacheConfig and SchedulerConfig by name, with their defaults
        and meaning there: e.g. ``LLM(model, num_blocks=64, max_model_len=256, generation_config="vllm")``.
        generation_config "auto": the model's generation_config.json gives the sampling defaults when
        generate() gets no params; "vllm": SamplingParams' own defaults apply.
        """
        from services.modelgen.default_model import resolve_model

        model = resolve_model(model)
        config = from_options(EngineConfig, "LLM", options, model=model)
        self.engine = LLMEngine(config)
        self.tokenizer = Tokenizer(model)
        defaults = self.engine.model_config.generation_defaults if config.generation_config == "auto" else {}
        self.default_sampling_params = SamplingParams.from_dict(dict(defaults))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        """Runs every prompt to completion; results come back in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or self.default_sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
        if len(params_list) != len(prompt_list):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompt_list)} prompts")
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt_list]
        results = [GenerationResult(i, ids) for i, ids in enumerate(token_lists)]
        valid = []
        for r, params, prompt in zip(results, params_list, prompt_list, strict=True):
            try:
                if isinstance(prompt, str) and not prompt:
                    raise InvalidRequest("the prompt is empty")  # encode("") is not empty: it holds the BOS token
                self.engine.make_request("probe", r.prompt_token_ids, params)
                valid.append(r.index)
            except InvalidRequest as e:
                r.error, r.finish_reason = str(e), "error"
        self._run(results, params_list, valid, use_tqdm)
        return results

    def _run(self, results: list[GenerationResult], params: list[SamplingParams], valid: list[int], bar: bool) -> None:
        """Runs the valid prompts, each as params.n requests (ids "<prompt index>.<output index>").

        Requests start in waves so that shared prompt KV comes from the prefix cache: per group of
        prompts with a common prefix the leader's output 0 runs first; its first token starts the
        group's other prompts (their output 0) and its own outputs 1..n-1, and each output 0 in
        turn starts its prompt's other outputs.
        """
        groups = prefix_groups([results[i].prompt_token_ids for i in valid], self.engine.config.block_size)
        on_first: dict[str, list[tuple[int, int]]] = {}  # request id -> (prompt, output) to start on its first token
        owner: dict[str, tuple[int, int]] = {}
        detoks: dict[str, IncrementalDetokenizer] = {}

        def submit(index: int, sample: int) -> str:
            rid = f"{index}.{sample}"
            p = params[index] if params[index].n == 1 else params[index].for_sample(sample)
            self.engine.add_request(rid, results[index].prompt_token_ids, p)
            detoks[rid] = IncrementalDetokenizer(self.tokenizer, p.stop, p.min_tokens)
            owner[rid] = (index, sample)
            on_first[rid] = [(index, k) for k in range(1, params[index].n)] if sample == 0 else []
            return rid

        for index in valid:
            logprobs = params[index].logprobs is not None
            results[index].outputs = [
                CompletionOutput(k, logprobs=[] if logprobs else None) for k in range(params[index].n)
            ]
        for group in groups:
            members = [valid[i] for i in group]
            on_first[submit(members[0], 0)] += [(m, 0) for m in members[1:]]
        progress = tqdm(total=sum(params[i].n for i in valid), disable=not bar, file=sys.stderr, desc="generate",
                        unit="req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                for index, sample in on_first.pop(out.request_id, []):
                    submit(index, sample)
                if self._collect(results, owner[out.request_id], out, detoks[out.request_id]):
                    progress.update(1)
        progress.close()

    def _collect(
        self, results: list[GenerationResult], owner: tuple[int, int], out: RequestOutput,
        detok: IncrementalDetokenizer,
    ) -> bool:
        """Adds one engine output to its result; True when that output is complete."""
        result = results[owner[0]]
        completion = result.outputs[owner[1]]
        completion.token_ids.extend(out.new_token_ids)
        if completion.logprobs is not None and out.logprobs is not None:
            completion.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        detok.add(out.new_token_ids)
        finish_reason = out.finish_reason
        if detok.stopped:
            if not out.finished:
                self.engine.abort([out.request_id], RequestStatus.FINISHED_STOPPED)
            finish_reason = "stop"
        if not (out.finished or detok.stopped):
            return False
        completion.text, completion.finish_reason = detok.text, finish_reason
        result.usage.completion_tokens += len(completion.token_ids)
        if completion.index == 0:
            result.token_ids, result.text, result.finish_reason = completion.token_ids, detok.text, finish_reason
            result.usage.prompt_tokens, result.usage.cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
        return True
