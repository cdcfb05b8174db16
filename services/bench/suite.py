"""`make bench`: pdserve's serving modes compared under the same CPU budget, plus the offline and transfer benches.

Starts `pdserve serve` three ways on the same total CPUs (disaggregated 1 prefill + 1 decode; colocated with
chunked prefill; colocated without), sweeps request rates on a prefill-heavy and a decode-heavy workload with
`pdserve bench serve`, writes bench/results/*.json and bench/results/serve.png, and prints goodput per mode
and workload with the ratios between modes. Then runs `pdserve bench offline` and `pdserve bench transfer`
as subprocesses at modest sizes and prints their figures (or a note when one fails).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.bench import serve as bench_serve
from services.bench.launch import REPO, launch
from services.bench.load import RunResult
from services.bench.metrics import Slo, Summary
from services.bench.report import rate_label, result_json, slo_text, write_json

CORES = 2  # the same total for every mode: this machine's cores


@dataclass(frozen=True)
class Mode:
    name: str
    serve_args: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    """A dataset shape, the rates to sweep and the SLO its goodput is judged by."""

    name: str
    input_len: str
    output_len: str
    num_requests: int
    rates: tuple[float, ...]
    slo: Slo

    def __post_init__(self) -> None:
        if not self.rates or self.num_requests < 1:
            raise ValueError(f"workload {self.name}: needs rates and at least one request")


MODES = (
    Mode("disagg-1p1d", ("--mode", "disagg", "--prefill-workers", "1", "--decode-workers", "1",
                         "--cpus-per-worker", str(CORES / 2))),
    # Sarathi-style: a small token budget per step, so a long prompt is cut into chunks between decode steps.
    Mode("colocated-chunked", ("--mode", "colocated", "--decode-workers", "1", "--cpus-per-worker", str(CORES),
                               "--max-num-batched-tokens", "512")),
    # Whole prompts per step: the budget must hold the longest prompt.
    Mode("colocated-nochunk", ("--mode", "colocated", "--decode-workers", "1", "--cpus-per-worker", str(CORES),
                               "--no-chunked-prefill", "--max-num-batched-tokens", "2048")),
)

# Rates, counts and SLOs measured for the tiny model on this 2-core machine (see bench/README.md).
WORKLOADS = (
    Workload("prefill-heavy", "800:1500", "8:16", 16, (0.75, 1.5, 3.0), Slo(ttft_ms=1500, tpot_ms=100)),
    Workload("decode-heavy", "32:64", "128:256", 32, (2.0, 4.0, 8.0, 16.0), Slo(ttft_ms=1000, tpot_ms=50)),
)


def _serve_args(target: str, workload: Workload, out: Path, tokenizer: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    slo = [f"{k}:{v:g}" for k, v in (("ttft", workload.slo.ttft_ms), ("tpot", workload.slo.tpot_ms),
                                      ("e2e", workload.slo.e2e_ms)) if v is not None]
    return parser.parse_args([
        "--target", target, "--tokenizer", tokenizer, "--dataset", "random",
        "--input-len", workload.input_len, "--output-len", workload.output_len,
        "--num-requests", str(workload.num_requests), "--request-rate", ",".join(map(rate_label, workload.rates)),
        "--goodput", *slo, "--seed", "0", "--result-json", str(out), "--disable-tqdm",
    ])


Results = dict[tuple[str, str], list[tuple[RunResult, Summary]]]


def run_serving(modes: tuple[Mode, ...], workloads: tuple[Workload, ...], model: str, out_dir: Path) -> Results:
    results: Results = {}
    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    print(f"server logs in {log_dir}", flush=True)
    for mode in modes:
        print(f"\n##### {mode.name}: pdserve serve {' '.join(mode.serve_args)}", flush=True)
        t0 = time.monotonic()
        try:
            server = launch(log_dir, "--model", model, *mode.serve_args)
        except (RuntimeError, TimeoutError) as e:
            print(f"!! {mode.name} did not start; skipped:\n{e}", flush=True)
            continue
        print(f"   up in {time.monotonic() - t0:.0f}s", flush=True)
        with server:
            for w in workloads:
                print(f"\n### {mode.name} / {w.name}: input {w.input_len}, output {w.output_len}, "
                      f"{w.num_requests} requests per rate, SLO {slo_text(w.slo)}", flush=True)
                json_path = out_dir / f"{mode.name}-{w.name}.json"
                args = _serve_args(server.grpc_url, w, json_path, model)
                t1 = time.monotonic()
                try:
                    runs = asyncio.run(bench_serve.bench(args))
                except (ValueError, ConnectionError) as e:
                    print(f"!! {mode.name}/{w.name} failed: {e}\n{server.log_tail(2000)}", flush=True)
                    continue
                write_json(json_path, result_json({"mode": mode.name, "serve_args": mode.serve_args,
                                                   **bench_serve._config_json(args)}, runs))
                results[(mode.name, w.name)] = runs
                print(f"   {w.name} took {time.monotonic() - t1:.0f}s", flush=True)
    return results


def _goodput_table(results: Results, modes: tuple[Mode, ...], workloads: tuple[Workload, ...]) -> list[str]:
    lines = []
    for w in workloads:
        lines.append(f"\n{w.name} (input {w.input_len}, output {w.output_len}; SLO {slo_text(w.slo)})")
        head = f"  {'mode':<20}" + "".join(f"{'@' + rate_label(r) + ' req/s':>13}" for r in w.rates)
        lines.append(head + f"{'best':>9}{'SLO% @max':>11}")
        best: dict[str, float] = {}
        for m in modes:
            runs = results.get((m.name, w.name))
            if runs is None:
                lines.append(f"  {m.name:<20}  (no result)")
                continue
            goodputs = [s.goodput or 0.0 for _, s in runs]
            best[m.name] = max(goodputs)
            cells = "".join(f"{g:>13.2f}" for g in goodputs)
            lines.append(f"  {m.name:<20}{cells}{best[m.name]:>9.2f}{runs[-1][1].slo_attainment_pct or 0:>10.0f}%")
        names = [m.name for m in modes if m.name in best]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ratio = f"{best[a] / best[b]:.2f}x" if best[b] > 0 else ("n/a (both 0)" if best[a] == 0 else "inf")
                lines.append(f"  best goodput {a} / {b}: {ratio}")
    return lines


def plot_suite(path: Path, results: Results, modes: tuple[Mode, ...], workloads: tuple[Workload, ...]) -> None:
    from services.bench.plot import plot_grid

    rows = []
    for w in workloads:
        series = {m.name: [(run.config.request_rate, s.slo_attainment_pct) for run, s in results[(m.name, w.name)]]
                  for m in modes if (m.name, w.name) in results}
        at_max = {m.name: results[(m.name, w.name)][-1][0] for m in modes if (m.name, w.name) in results}
        ttft = {name: [r.ttft_s for r in run.records if r.success and r.ttft_s is not None]
                for name, run in at_max.items()}
        tpot = {name: [t for r in run.records if r.success and r.output_tokens > 1 and (t := r.tpot_s) is not None]
                for name, run in at_max.items()}
        top = rate_label(w.rates[-1])
        rows.append([
            ("attainment", (series, f"{w.name}: SLO attainment")),
            ("cdf", (ttft, f"{w.name}: TTFT @ {top} req/s", "TTFT (ms)")),
            ("cdf", (tpot, f"{w.name}: TPOT @ {top} req/s", "TPOT (ms)")),
        ])
    if rows:
        plot_grid(path, rows, f"pdserve serving modes on {CORES} CPU cores")


def run_subbench(name: str, args: list[str], timeout_s: float) -> list[str]:
    """`pdserve bench NAME ARGS` as a subprocess; its printed figures, or a note saying why there are none."""
    cmd = [sys.executable, "-m", "services.cli", "bench", name, *args]
    print(f"\n##### pdserve bench {name} {' '.join(args)}", flush=True)
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return [f"(skipped: pdserve bench {name} ran past {timeout_s:.0f}s)"]
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return [f"(skipped: pdserve bench {name} exited with {done.returncode})", *("  " + t for t in tail)]
    print(f"   took {time.monotonic() - t0:.0f}s", flush=True)
    return done.stdout.rstrip().splitlines()


SUBBENCHES: dict[str, list[str]] = {
    "offline": ["--num-prompts", "32", "--input-len", "64:256", "--output-len", "16:64"],
    "transfer": ["--sizes-mib", "1,4,16", "--repeats", "3", "--rounds", "1"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.suite", description=__doc__)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--model", default=None, help="model directory (default: pdserve's built-in tiny model)")
    parser.add_argument("--modes", default=",".join(m.name for m in MODES))
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    parser.add_argument("--skip-subbenches", action="store_true", help="only the serving comparison")
    args = parser.parse_args(argv)
    modes = tuple(m for m in MODES if m.name in args.modes.split(","))
    workloads = tuple(w for w in WORKLOADS if w.name in args.workloads.split(","))
    if not modes or not workloads:
        parser.error(f"choose modes from {[m.name for m in MODES]} and workloads from {[w.name for w in WORKLOADS]}")
    from services.modelgen.default_model import resolve_model

    args.model = resolve_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results = run_serving(modes, workloads, args.model, out)
    plot_suite(out / "serve.png", results, modes, workloads)
    sub: dict[str, list[str]] = {}
    if not args.skip_subbenches:
        for name, sub_args in SUBBENCHES.items():
            sub[name] = run_subbench(name, sub_args, timeout_s=300)
    lines = [f"\n{'=' * 30} pdserve bench suite {'=' * 30}",
             f"model {args.model}; {CORES} CPU cores per mode; goodput = requests/s meeting the SLO"]
    lines += _goodput_table(results, modes, workloads)
    for name, figures in sub.items():
        lines += [f"\npdserve bench {name}:", *("  " + f for f in figures)]
    lines.append(f"\nresults in {out} (serve.png, *.json); total {time.monotonic() - t0:.0f}s")
    print("\n".join(lines), flush=True)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    (out / "suite.json").write_text(json.dumps({
        "modes": {m.name: list(m.serve_args) for m in modes},
        "workloads": {w.name: {"input_len": w.input_len, "output_len": w.output_len, "rates": list(w.rates),
                               "num_requests": w.num_requests, "slo": slo_text(w.slo)} for w in workloads},
        "goodput": {f"{m}/{w}": [s.goodput for _, s in runs] for (m, w), runs in results.items()},
        "subbenches": sub,
    }, indent=1) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
