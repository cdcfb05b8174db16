"""`pdserve offline`: a JSONL batch through the offline LLM API.

Input line:  {"id", "prompt" | "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
              "stop", "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "min_p", "min_tokens", "logit_bias"}; any other key is refused
Output line: {"id", "token_ids", "text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens",
              "cached_tokens"}} in input order; a bad line gets {"id", "error"} and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from services.config_flags import ConfigFlags
from services.engine.config import CacheConfig, SchedulerConfig
from services.engine.errors import InvalidRequest
from services.engine.llm import LLM, GenerationResult
from services.engine.sampling_params import SamplingParams

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens", "logit_bias")
_KEYS = {"id", "prompt", "prompt_token_ids", *_SAMPLING_KEYS}


@dataclass
class OfflineItem:
    id: Any
    prompt: str | list[int] | None = None
    params: SamplingParams | None = None
    error: str | None = None


def parse_line(line: str, line_no: int) -> OfflineItem:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        return OfflineItem(id=None, error=f"line {line_no}: malformed JSON: {e.msg}")
    if not isinstance(data, dict):
        return OfflineItem(id=None, error=f"line {line_no}: expected a JSON object")
    item = OfflineItem(id=data.get("id", line_no))
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        item.error = f"line {line_no}: unknown key(s): {', '.join(unknown)}"
        return item
    has_text, has_ids = "prompt" in data, "prompt_token_ids" in data
    if has_text == has_ids:
        item.error = f"line {line_no}: give exactly one of 'prompt' or 'prompt_token_ids'"
        return item
    prompt = data["prompt"] if has_text else data["prompt_token_ids"]
    if has_text and not isinstance(prompt, str):
        item.error = f"line {line_no}: 'prompt' must be a string"
        return item
    if has_ids and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        item.error = f"line {line_no}: 'prompt_token_ids' must be a list of integers"
        return item
    item.prompt = prompt
    sampling = {k: data[k] for k in _SAMPLING_KEYS if k in data}
    sampling.setdefault("max_tokens", 16)
    try:
        item.params = SamplingParams.from_dict(sampling)
    except InvalidRequest as e:
        item.error = f"line {line_no}: {e}"
    return item


def result_record(item: OfflineItem, result: GenerationResult | None) -> dict[str, Any]:
    if item.error is not None or result is None:
        return {"id": item.id, "error": item.error}
    if result.error is not None:
        return {"id": item.id, "error": result.error}
    u = result.usage
    return {
        "id": item.id,
        "token_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens,
        },
    }


def run_offline(llm: LLM, lines: list[str], use_tqdm: bool = True) -> list[dict[str, Any]]:
    items = [parse_line(line, n) for n, line in enumerate(lines, 1) if line.strip()]
    good = [i for i in items if i.error is None and i.prompt is not None and i.params is not None]
    prompts: list[str | list[int]] = [i.prompt for i in good if i.prompt is not None]
    params = [i.params for i in good if i.params is not None]
    results = llm.generate(prompts, params, use_tqdm=use_tqdm)
    by_item = {id(i): r for i, r in zip(good, results, strict=True)}
    return [result_record(i, by_item.get(id(i))) for i in items]


# The engine settings `pdserve offline` takes (defaults and help on the config fields).
_CACHE_FLAGS = ConfigFlags(CacheConfig, exclude=("num_blocks", "kv_cache_bytes", "enable_prefix_caching"))
_SCHEDULER_FLAGS = ConfigFlags(SchedulerConfig, exclude=("enable_chunked_prefill",))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--input", required=True, help="JSONL file of requests")
    parser.add_argument("--output", required=True, help="JSONL file for the results, in input order")
    _CACHE_FLAGS.add_to(parser)
    _SCHEDULER_FLAGS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """Body of `pdserve offline`: 0 when the batch ran (bad lines get error records), 2 when it could not start."""
    try:
        with open(args.input) as f:
            lines = f.readlines()
        output = open(args.output, "w")  # opened before the run, so a bad path fails fast
    except (OSError, UnicodeDecodeError) as e:
        print(f"pdserve offline: error: {e}", file=sys.stderr)
        return 2
    with output:
        try:
            llm = LLM(args.model, **_CACHE_FLAGS.values(args), **_SCHEDULER_FLAGS.values(args))
        except (OSError, ValueError) as e:  # ValueError covers UnsupportedModel and bad engine configs
            print(f"pdserve offline: error: {e}", file=sys.stderr)
            return 2
        for record in run_offline(llm, lines):
            output.write(json.dumps(record) + "\n")
    return 0
