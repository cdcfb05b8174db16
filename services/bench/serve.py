"""`pdserve bench serve`: a serving load generator against pdserve's gRPC API or any OpenAI-compatible server.

Sends a dataset at Poisson arrival rates (a comma list sweeps them), optionally capped at a number of requests
in flight, and reports throughput, TTFT/TPOT/ITL/E2E percentiles and goodput under an SLO, as vLLM's
`bench serve` and SGLang's bench_serving do.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from services.bench import token_stages
from services.bench.datasets import (
    Conversation,
    LengthRange,
    TextCodec,
    TokenSpace,
    load_sharegpt,
    multi_turn_dataset,
    random_dataset,
    shared_prefix_dataset,
)
from services.bench.http_target import base_url
from services.bench.load import LoadConfig, RunResult, parse_rates, run_load
from services.bench.metrics import Slo, Summary, summarize
from services.bench.prompt import build_request
from services.bench.report import print_summary, print_sweep, rate_label, result_json, write_json
from services.bench.target import Target, TargetInfo, make_target

DATASETS = ("random", "shared-prefix", "multi-turn", "sharegpt")
CHECK_SEED = 1_000_003


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--target", required=True, help="grpc://HOST:PORT (pdserve) or http://HOST:PORT (OpenAI API)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions", help="HTTP targets only")
    p.add_argument("--model", default=None, help="model name sent to an HTTP target (default: first of /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="model directory whose tokenizer.json makes text prompts and measures ShareGPT lengths "
                   "(default: --model when it is a directory, else pdserve's built-in tiny model)")
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (--dataset sharegpt)")
    p.add_argument("--num-requests", type=int, default=100, help="random and sharegpt: requests to send")
    p.add_argument("--min-duration-s", type=float, default=0.0,
                   help="random: a rate's run sends at least rate x this many requests, so that its arrivals span "
                        "this long; a server's saturation shows only when its queue outlasts the arrivals")
    p.add_argument("--input-len", default="128", help="prompt tokens, N or A:B (random; multi-turn user turns)")
    p.add_argument("--output-len", default="32", help="output tokens, N or A:B (random, shared-prefix, multi-turn)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override ShareGPT reply lengths")
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: groups (one system prompt each)")
    p.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix: questions per group")
    p.add_argument("--system-prompt-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    p.add_argument("--question-len", type=int, default=64, help="shared-prefix: question tokens")
    p.add_argument("--num-conversations", type=int, default=None,
                   help="multi-turn: conversations (default: --num-requests / --turns)")
    p.add_argument("--turns", type=int, default=3, help="multi-turn: user turns per conversation")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit for filtering (default: what the server reports, else 2048)")
    p.add_argument("--request-rate", default="inf",
                   help="Poisson arrivals per second; a comma list runs a sweep; inf sends everything at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (closed loop)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLO targets for goodput, e.g. ttft:500 tpot:50 (keys: ttft, tpot, e2e)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="dataset and arrival seed; the i-th rate of a sweep uses seed+i")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    p.add_argument("--result-json", default=None, help="write every figure and per-request record here")
    p.add_argument("--plot", default=None, help="write latency CDFs (and attainment against rate) to this PNG")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--metrics-url", default=None,
                   help="a pdserve router's /metrics, for the per-token path of each run (default: an http "
                        "target's own; 'none' for none)")


def _needs_text(args: argparse.Namespace) -> bool:
    http = args.target.startswith("http")
    return args.dataset == "sharegpt" or args.endpoint == "chat" or (http and args.dataset == "multi-turn")


def _tokenizer_dir(args: argparse.Namespace) -> Path:
    if args.tokenizer:
        path = Path(args.tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"--tokenizer {path} has no tokenizer.json")
        return path
    if args.model and (Path(args.model) / "tokenizer.json").is_file():
        return Path(args.model)
    from services.modelgen.default_model import resolve_model

    return Path(resolve_model(None))


def _special_ids(model_dir: Path) -> frozenset[int]:
    added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens") or []
    return frozenset(int(t["id"]) for t in added if t.get("special"))


def _token_space(info: TargetInfo, codec_dir: Path | None, codec: Any) -> TokenSpace:
    excluded = _special_ids(codec_dir) if codec_dir is not None else frozenset()
    if info.eos_token_id is not None:
        excluded |= {info.eos_token_id}
    vocab = info.vocab_size or (codec.vocab_size if codec is not None else None)
    if vocab is None:
        raise ValueError("the target does not report its vocabulary size; pass --tokenizer")
    return TokenSpace(vocab, excluded)


def build_dataset(args: argparse.Namespace, codec: TextCodec | None, space: TokenSpace | None,
                  max_model_len: int, seed: int) -> list[Conversation]:
    output = LengthRange.parse(args.output_len)
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE")
        assert codec is not None
        return load_sharegpt(args.dataset_path, args.num_requests, codec, max_model_len, seed,
                             args.sharegpt_output_len)
    assert space is not None
    if args.dataset == "shared-prefix":
        if args.system_prompt_len + args.question_len + output.high > max_model_len:
            raise ValueError(f"shared-prefix prompts plus output exceed the context of {max_model_len} tokens")
        return shared_prefix_dataset(args.num_groups, args.prompts_per_group, args.system_prompt_len,
                                     args.question_len, output, space, seed, codec)
    inputs = LengthRange.parse(args.input_len)
    if args.dataset == "multi-turn":
        turns = args.turns
        if turns * (inputs.high + output.high) > max_model_len:
            raise ValueError(f"{turns} turns of up to {inputs.high}+{output.high} tokens exceed the context of "
                             f"{max_model_len} tokens")
        conversations = args.num_conversations or max(1, args.num_requests // max(turns, 1))
        return multi_turn_dataset(conversations, turns, inputs, output, space, seed, codec)
    if inputs.high + output.high > max_model_len:
        raise ValueError(f"--input-len {args.input_len} plus --output-len {args.output_len} exceed the context of "
                         f"{max_model_len} tokens")
    return random_dataset(args.num_requests, inputs, output, space, seed, codec)


async def _check(target: Target, conversations: list[Conversation], temperature: float) -> None:
    """One short request before the run, so a misconfigured target fails fast with the server's error."""
    first = build_request(conversations[0], 0, [])
    request = dataclasses.replace(first, max_tokens=min(first.max_tokens, 4))
    outcome = await target.generate(request, temperature)
    if not outcome.success:
        raise ConnectionError(f"the test request to {target.url} failed: {outcome.error}")


def _validate(args: argparse.Namespace) -> tuple[list[float], Slo | None]:
    rates = parse_rates(args.request_rate)
    slo = Slo.parse(args.goodput) if args.goodput else None
    if args.num_requests < 1:
        raise ValueError("--num-requests must be at least 1")
    if args.timeout_s <= 0:
        raise ValueError("--timeout-s must be positive")
    if args.min_duration_s < 0:
        raise ValueError("--min-duration-s must be >= 0")
    LengthRange.parse(args.output_len)
    LengthRange.parse(args.input_len)
    return rates, slo


async def bench(args: argparse.Namespace) -> list[tuple[RunResult, Summary]]:
    """Runs the whole sweep; prints each run's figures; returns them."""
    rates, slo = _validate(args)
    target = make_target(args.target, args.endpoint, args.model, args.timeout_s)
    info = await target.open()
    try:
        codec_dir: Path | None = None
        codec: Any = None
        if _needs_text(args) or args.target.startswith("http"):
            from services.engine.tokenizer import Tokenizer

            codec_dir = _tokenizer_dir(args)
            codec = Tokenizer(codec_dir)
        max_len = args.max_model_len or info.max_model_len or 2048
        space = None if args.dataset == "sharegpt" else _token_space(info, codec_dir, codec)
        text_codec = codec if _needs_text(args) else None
        # The check request and each rate of a sweep get prompts of their own (seed + offset), so the server's
        # prefix cache cannot carry one run's prompts into the next.
        await _check(target, build_dataset(args, text_codec, space, max_len, args.seed + CHECK_SEED), args.temperature)
        runs: list[tuple[RunResult, Summary]] = []
        metrics_url = _metrics_url(args)
        for i, rate in enumerate(rates):
            conversations = build_dataset(requests_for_rate(args, rate), text_codec, space, max_len, args.seed + i)
            config = LoadConfig(rate, args.max_concurrency, args.seed + i, args.temperature)
            before = await token_stages.scrape(metrics_url) if metrics_url else {}
            run = await run_load(target, conversations, config, not args.disable_tqdm,
                                 f"rate {rate_label(rate)}")
            if metrics_url:
                stages = token_stages.stage_medians(before, await token_stages.scrape(metrics_url))
                run = dataclasses.replace(run, token_stages=stages)
            summary = summarize(run.records, run.duration_s, slo)
            print_summary(sys.stdout, run, summary)
            runs.append((run, summary))
    finally:
        await target.close()
    if len(runs) > 1:
        print_sweep(sys.stdout, runs)
    sys.stdout.flush()
    return runs


def requests_for_rate(args: argparse.Namespace, rate: float) -> argparse.Namespace:
    """The arguments of one rate's run: --num-requests, or more where --min-duration-s asks (random dataset)."""
    if args.dataset != "random" or not math.isfinite(rate):
        return args
    return argparse.Namespace(**{**vars(args), "num_requests": max(args.num_requests,
                                                                    math.ceil(rate * args.min_duration_s))})


def _metrics_url(args: argparse.Namespace) -> str | None:
    if args.metrics_url is not None:
        return None if args.metrics_url == "none" else args.metrics_url
    return base_url(args.target) + "/metrics" if args.target.startswith("http") else None


def _config_json(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"_module", "command", "bench"}
    config = {k: v for k, v in vars(args).items() if k not in skip}
    config["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return config


def run(args: argparse.Namespace) -> int:
    try:
        runs = asyncio.run(bench(args))
    except (ValueError, ConnectionError) as e:
        print(f"pdserve bench serve: error: {e}", file=sys.stderr)
        return 2
    if args.result_json:
        write_json(args.result_json, result_json(_config_json(args), runs))
    if args.plot:
        from services.bench.plot import plot_serve

        title = f"{args.dataset} on {args.target}"
        plot_serve(args.plot, runs, title)
    completed = sum(s.completed for _, s in runs)
    return 0 if completed > 0 else 1
