"""`pdserve bench compare` (`make bench-peers`): pdserve beside llama.cpp's llama-server on the same model,
the same load and the same machine, one server at a time.

1. Builds llama-server from the llama-cpp-python sdist (cached under .tools/llama.cpp/) and converts the model
   to an f32 GGUF with that tree's own converter (llama_server.py).
2. For each server (llama-server with 16 slots on 2 threads, `pdserve serve --mode colocated`,
   `pdserve serve --mode disagg` 1+1): the `pdserve bench serve` sweep over HTTP /v1/completions, then
   one request at a time. llama-server also runs the offline batch, and greedy check prompts one at a time.
3. pdserve's offline `LLM` engine runs the same offline batch and the check prompts (no server up), and the
   greedy tokens of both are compared.
4. Writes bench/results/peers/: peers.json, peers.md (the tables), peers.png (SLO attainment against rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from services.bench import llama_server
from services.bench import serve as bench_serve
from services.bench.datasets import LengthRange, TokenSpace
from services.bench.launch import REPO
from services.bench.launch import launch as launch_pdserve
from services.bench.offline import Workload, make_workload
from services.bench.peers_report import SLO_A, PeerResult, markdown, plot, results_json
from services.bench.report import rate_label, write_json

CHECK_TEXT = "The harbor was quiet"
CHECK_TOKENS = 32


@dataclass(frozen=True)
class Peer:
    name: str
    serve_args: tuple[str, ...]  # `pdserve serve` flags; empty for llama-server


PEERS = (
    Peer("llama-server", ()),
    Peer("pdserve colocated", ("--mode", "colocated")),
    Peer("pdserve disagg 1+1", ("--mode", "disagg", "--prefill-workers", "1", "--decode-workers", "1")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", default=None, help="model directory (default: pdserve's built-in tiny model)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "peers"), help="where the results go")
    p.add_argument("--servers", default=",".join(x.name for x in PEERS), help="comma list of servers to run")
    p.add_argument("--num-requests", type=int, default=32, help="requests per rate of the sweep (at least)")
    p.add_argument("--min-duration-s", type=float, default=8.0,
                   help="each rate sends at least rate x this many requests (bench serve --min-duration-s): with "
                        "32 requests at 16 req/s the arrivals end before a server's queue shows")
    p.add_argument("--request-rate", default="1,2,3,4,5,6,8,10,12,16",
                   help="Poisson rates of the sweep, req/s: on to where every server saturates on 2 cores (2-6 "
                        "req/s on a Zen 3 host, 8-12 on a Zen 4), in steps of 1 or 2 around there, since a server's "
                        "goodput is its best rate's")
    p.add_argument("--input-len", default="256:1024")
    p.add_argument("--output-len", default="32:128")
    p.add_argument("--single-requests", type=int, default=8,
                   help="one-at-a-time requests (input 256, output 128; 0: none)")
    p.add_argument("--offline-prompts", type=int, default=32)
    p.add_argument("--offline-input-len", default="64:512")
    p.add_argument("--offline-output-len", default="16:256")
    p.add_argument("--llama-slots", type=int, default=16, help="llama-server -np (context: 2048 per slot)")
    p.add_argument("--llama-threads", type=int, default=2, help="llama-server -t and -tb")
    p.add_argument("--seed", type=int, default=0)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "num_requests": args.num_requests, "min_duration_s": args.min_duration_s,
        "rates": [float(r) for r in args.request_rate.split(",")],
        "input_len": args.input_len, "output_len": args.output_len,
        "single_requests": args.single_requests, "single_input": 256, "single_output": 128,
        "offline_prompts": args.offline_prompts, "offline_input": args.offline_input_len,
        "offline_output": args.offline_output_len, "llama_slots": args.llama_slots,
        "llama_threads": args.llama_threads, "seed": args.seed, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _serve_args(args: argparse.Namespace, url: str, single: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    shape = (["--input-len", "256", "--output-len", "128", "--num-requests", str(args.single_requests),
              "--request-rate", "inf", "--max-concurrency", "1"] if single else
             ["--input-len", args.input_len, "--output-len", args.output_len,
              "--num-requests", str(args.num_requests), "--min-duration-s", str(args.min_duration_s),
              "--request-rate", args.request_rate])
    slo = [f"ttft:{SLO_A.ttft_ms:g}", f"tpot:{SLO_A.tpot_ms:g}"]
    return parser.parse_args(["--target", url, "--tokenizer", args.model, "--dataset", "random", *shape,
                              "--goodput", *slo, "--seed", str(args.seed), "--disable-tqdm"])


def measure(args: argparse.Namespace, result: PeerResult, url: str) -> None:
    """The sweep and the one-at-a-time run (unless --single-requests 0) against the server at `url`, into
    `result`."""
    for single in (False, True) if args.single_requests else (False,):
        label = "one request at a time" if single else f"sweep at {args.request_rate} req/s"
        print(f"\n### {result.name}: {label}", flush=True)
        t0 = time.monotonic()
        try:
            runs = asyncio.run(bench_serve.bench(_serve_args(args, url, single)))
        except (ValueError, ConnectionError) as e:
            result.errors.append(f"{label}: {e}")
            continue
        if single:
            result.single = runs
        else:
            result.sweep = runs
        print(f"   took {time.monotonic() - t0:.0f}s", flush=True)


def offline_workload(args: argparse.Namespace) -> Workload:
    """The offline batch, made as `pdserve bench offline` makes it (no BOS or EOS among the prompt ids)."""
    config = json.loads((Path(args.model) / "config.json").read_text())
    special = frozenset(int(t) for t in (config.get("bos_token_id"), config.get("eos_token_id")) if t is not None)
    return make_workload(args.offline_prompts, LengthRange.parse(args.offline_input_len),
                         LengthRange.parse(args.offline_output_len), TokenSpace(config["vocab_size"], special),
                         args.seed)


def check_prompts(args: argparse.Namespace) -> list[list[int]]:
    """Greedy check prompts: a text prompt as the tokenizer encodes it (BOS first) and 100 random token ids."""
    from services.engine.tokenizer import Tokenizer

    config = json.loads((Path(args.model) / "config.json").read_text())
    space = TokenSpace(config["vocab_size"], frozenset({config["bos_token_id"], config["eos_token_id"]}))
    return [Tokenizer(args.model).encode(CHECK_TEXT), list(space.sample(random.Random(args.seed + 7), 100))]


@dataclass
class GreedyTokens:
    """What a server or engine generated, greedy, for the check prompts and the offline batch."""

    check: list[list[int]]
    offline: list[list[int]]


def run_llama(args: argparse.Namespace, log_dir: Path, workload: Workload) -> tuple[PeerResult, GreedyTokens | None]:
    t0 = time.monotonic()
    print("##### llama-server: build (about 12 minutes on 2 cores unless cached) and GGUF", flush=True)
    llama = llama_server.build(log=log_dir / "llama-build.log")
    gguf = llama_server.convert(llama, Path(args.model))
    print(f"   llama.cpp {llama.version}: {llama.server}, {gguf} ({time.monotonic() - t0:.0f}s)", flush=True)
    command = " ".join(llama_server.server_args(llama, gguf, 0, Path(args.model).name, args.llama_slots,
                                                args.llama_threads)).replace("--port 0", "--port PORT")
    result = PeerResult("llama-server", command)
    with llama_server.launch(llama, gguf, Path(args.model).name, log_dir, slots=args.llama_slots,
                             threads=args.llama_threads) as server:
        measure(args, result, server.http_url)
        print("\n### llama-server: greedy check prompts, then the offline batch", flush=True)
        try:
            check = [asyncio.run(llama_server.complete(server.http_url, [p], [CHECK_TOKENS]))[0]
                     for p in check_prompts(args)]
            start = time.perf_counter()
            offline = asyncio.run(llama_server.complete(server.http_url, workload.prompts, workload.output_lens))
        except (httpx.HTTPError, KeyError) as e:
            result.errors.append(f"offline batch: {type(e).__name__}: {e}")
            return result, None
        result.offline_seconds = time.perf_counter() - start
        result.offline_tokens_per_s = workload.num_output_tokens / result.offline_seconds
    return result, GreedyTokens(check, offline)


def run_pdserve(args: argparse.Namespace, peer: Peer, log_dir: Path) -> PeerResult:
    result = PeerResult(peer.name, "pdserve serve " + " ".join(peer.serve_args))
    print(f"\n##### {peer.name}: {result.command}", flush=True)
    try:
        server = launch_pdserve(log_dir, "--model", args.model, *peer.serve_args)
    except (RuntimeError, TimeoutError) as e:
        result.errors.append(f"did not start: {str(e)[-2000:]}")
        return result
    with server:
        measure(args, result, server.http_url)
    return result


def run_offline_engine(args: argparse.Namespace, workload: Workload) -> tuple[PeerResult, GreedyTokens]:
    """pdserve's offline `LLM` on the offline batch (after a warm-up) and on the check prompts one at a time."""
    from services.bench.offline import run_pdserve as run_engine
    from services.engine.llm import LLM
    from services.engine.sampling_params import SamplingParams

    print("\n##### pdserve offline engine", flush=True)
    llm = LLM(args.model, kv_cache_bytes=2**29)
    run_engine(llm, Workload([[1] * 8, [2] * 8], [4, 4]))
    timed = run_engine(llm, workload)
    greedy = SamplingParams(temperature=0, max_tokens=CHECK_TOKENS, ignore_eos=True)
    check = [llm.generate([p], greedy, use_tqdm=False)[0].token_ids for p in check_prompts(args)]
    result = PeerResult("pdserve offline engine", "LLM(model).generate(prompts)",
                        offline_tokens_per_s=timed.tokens_per_s(workload), offline_seconds=timed.seconds,
                        server=False, decode_step_ms=decode_step_ms(args.model))
    return result, GreedyTokens(check, timed.tokens)


def decode_step_ms(model: str, context: int = 256, steps: int = 60) -> float:
    """The engine's decode step at batch 1 on one thread, as the disagg decode worker runs it: the median of
    `steps` steps of one request of `context` prompt tokens (last in the run: it sets torch's threads to 1)."""
    import statistics

    import torch

    from services.bench.step import Timings, time_steps
    from services.engine.config import CacheConfig, EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(model=model, num_threads=1, cache=CacheConfig(kv_cache_bytes=2**28)))
    engine.add_request("step", list(range(10, 10 + context)),
                       SamplingParams(temperature=0, max_tokens=steps + 10, ignore_eos=True))
    for _ in range(5):
        engine.step()
    timings = Timings()
    time_steps(engine, steps, timings)
    return statistics.median(timings.wall_s) * 1e3


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare_greedy(ours: GreedyTokens, theirs: GreedyTokens) -> tuple[dict[str, Any], list[str]]:
    """Token-for-token agreement of pdserve's engine and llama-server: the JSON record and the report's lines."""
    check = [{"pdserve": a, "llama_server": b, "same": a == b, "common_prefix": _prefix(a, b)}
             for a, b in zip(ours.check, theirs.check, strict=True)]
    same = sum(a == b for a, b in zip(ours.offline, theirs.offline, strict=True))
    agreed = sum(_prefix(a, b) for a, b in zip(ours.offline, theirs.offline, strict=True))
    total = sum(len(a) for a in ours.offline)
    checks = "; ".join(f"check prompt {i + 1}: " + ("same" if c["same"] else f"differs at token {c['common_prefix']}")
                       for i, c in enumerate(check))
    line = (f"Greedy tokens, pdserve's offline engine against llama-server on the f32 GGUF, {CHECK_TOKENS} tokens "
            f"one request at a time: {checks}. Offline batch (batched on both sides): identical for "
            f"{same}/{len(ours.offline)} requests, {agreed / max(total, 1):.1%} of tokens before the first divergence.")
    record = {"check": check, "offline_identical": same, "offline_requests": len(ours.offline),
              "offline_tokens_before_divergence": agreed, "offline_tokens": total}
    return record, [line]


def run(args: argparse.Namespace) -> int:
    from services.modelgen.default_model import resolve_model

    args.model = resolve_model(args.model)
    chosen = [p for p in PEERS if p.name in args.servers.split(",")]
    if not chosen:
        print(f"pdserve bench compare: error: --servers names none of {[p.name for p in PEERS]}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-peers-"))
    print(f"server logs in {log_dir}", flush=True)
    t0 = time.monotonic()
    workload = offline_workload(args)
    results: list[PeerResult] = []
    theirs: GreedyTokens | None = None
    for peer in chosen:
        if peer.serve_args:
            results.append(run_pdserve(args, peer, log_dir))
        else:
            try:
                llama, theirs = run_llama(args, log_dir, workload)
            except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as e:
                llama = PeerResult(peer.name, "llama-server", errors=[str(e)[-2000:]])
            results.append(llama)
    engine, ours = run_offline_engine(args, workload)
    results.append(engine)
    checks, notes = compare_greedy(ours, theirs) if theirs is not None else ({}, [])
    config = _config(args)
    notes.append(f"Total time {time.monotonic() - t0:.0f}s.")
    report = markdown(results, config, notes)
    write_json(out / "peers.json", results_json(results, config, checks))
    (out / "peers.md").write_text(report)
    plot(out / "peers.png", results, f"pdserve and llama-server, {Path(args.model).name}, "
         f"{rate_label(float(config['rates'][0]))}-{rate_label(float(config['rates'][-1]))} req/s")
    print("\n" + report + f"\nresults in {out} (peers.md, peers.json, peers.png)", flush=True)
    return 0 if all(r.sweep for r in results if r.server) else 1
