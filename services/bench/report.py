"""Prints a run's figures as vLLM's bench serve does, a sweep as one table, and writes the result JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

from services.bench.load import RunResult
from services.bench.metrics import Distribution, Slo, Summary

WIDTH = 52


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _line(out: TextIO, name: str, value: Any) -> None:
    out.write(f"{name + ':':<40}{value:>{WIDTH - 40}}\n")


def _distribution(out: TextIO, title: str, d: Distribution) -> None:
    out.write(f"{'-' * 12}{title:^{WIDTH - 24}}{'-' * 12}\n")
    for name, value in (("Mean", d.mean), ("Median", d.median), ("P90", d.p90), ("P99", d.p99)):
        _line(out, f"{name} {title.split()[0]} (ms)", _fmt(value))


def slo_text(slo: Slo | None) -> str:
    if slo is None:
        return "none"
    parts = [f"{k} <= {v:g} ms" for k, v in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms), ("E2E", slo.e2e_ms))
             if v is not None]
    return ", ".join(parts)


def print_summary(out: TextIO, run: RunResult, s: Summary) -> None:
    out.write(f"{' Serving Benchmark Result ':=^{WIDTH}}\n")
    _line(out, "Request rate (req/s)", rate_label(run.config.request_rate))
    _line(out, "Max concurrency", run.config.max_concurrency or "none")
    _line(out, "Successful requests", s.completed)
    _line(out, "Failed requests", s.failed)
    _line(out, "Benchmark duration (s)", _fmt(s.duration_s))
    _line(out, "Total input tokens", s.total_input_tokens)
    _line(out, "Total generated tokens", s.total_output_tokens)
    _line(out, "Request throughput (req/s)", _fmt(s.request_throughput))
    _line(out, "Output token throughput (tok/s)", _fmt(s.output_throughput))
    _line(out, "Total token throughput (tok/s)", _fmt(s.total_token_throughput))
    if s.slo is not None:
        _line(out, "SLO", slo_text(s.slo))
        _line(out, "Request goodput (req/s)", _fmt(s.goodput))
        _line(out, "SLO attainment (%)", _fmt(s.slo_attainment_pct, 1))
    _distribution(out, "TTFT", s.ttft_ms)
    _distribution(out, "TPOT (excl. 1st token)", s.tpot_ms)
    _distribution(out, "ITL", s.itl_ms)
    _distribution(out, "E2E latency", s.e2e_ms)
    if run.token_stages:
        out.write(f"{'Per-token path, median (ms)':-^{WIDTH}}\n")
        for stage, seconds in run.token_stages.items():
            _line(out, f"  {stage}", _fmt(None if seconds is None else seconds * 1e3, 3))
    for error, count in s.errors.items():
        out.write(f"error x{count}: {error}\n")
    out.write("=" * WIDTH + "\n")


def print_sweep(out: TextIO, runs: list[tuple[RunResult, Summary]]) -> None:
    """One row per rate: throughput, goodput, attainment and the median/p99 latencies."""
    head = (f"{'rate':>6} {'ok':>5} {'fail':>4} {'req/s':>7} {'tok/s':>8} {'goodput':>8} {'SLO%':>6} "
            f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'E2E p50':>9}")
    out.write(head + "\n" + "-" * len(head) + "\n")
    for run, s in runs:
        out.write(f"{rate_label(run.config.request_rate):>6} {s.completed:>5} {s.failed:>4} "
                  f"{s.request_throughput:>7.2f} {s.output_throughput:>8.1f} {_fmt(s.goodput):>8} "
                  f"{_fmt(s.slo_attainment_pct, 1):>6} {_fmt(s.ttft_ms.median, 1):>9} {_fmt(s.ttft_ms.p99, 1):>9} "
                  f"{_fmt(s.tpot_ms.median, 1):>9} {_fmt(s.tpot_ms.p99, 1):>9} {_fmt(s.e2e_ms.median, 1):>9}\n")


def _finite(value: Any) -> Any:
    """JSON has no Infinity: an infinite rate is written as the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def result_json(config: dict[str, Any], runs: list[tuple[RunResult, Summary]]) -> dict[str, Any]:
    return _finite({
        "config": config,
        "runs": [
            {
                "request_rate": run.config.request_rate,
                "max_concurrency": run.config.max_concurrency,
                "seed": run.config.seed,
                "summary": s.to_json(),
                "token_stages": run.token_stages,
                "requests": [r.to_json() for r in run.records],
            }
            for run, s in runs
        ],
    })


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, allow_nan=False) + "\n")
