"""The figures and tables of `pdserve bench compare`, computed from the runs' per-request records (pure: no
servers, no torch): goodput under two SLOs, TPOT at the lowest rate, the one-at-a-time latencies and the
offline throughput, as markdown, JSON and a plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.bench.load import RunResult
from services.bench.metrics import Slo, Summary, summarize
from services.bench.report import rate_label, result_json, slo_text

SLO_A = Slo(ttft_ms=3000, tpot_ms=150)
SLO_B = Slo(ttft_ms=3000, tpot_ms=50)

Runs = list[tuple[RunResult, Summary]]


@dataclass
class PeerResult:
    """Everything measured of one server; a part that failed is left empty with its reason in `errors`."""

    name: str
    command: str
    sweep: Runs = field(default_factory=list)
    single: Runs = field(default_factory=list)
    offline_tokens_per_s: float | None = None
    offline_seconds: float | None = None
    errors: list[str] = field(default_factory=list)
    server: bool = True  # False for pdserve's offline engine, which has only the offline row
    decode_step_ms: float | None = None  # the offline engine: its decode step at batch 1 on one thread


def goodputs(runs: Runs, slo: Slo) -> list[float]:
    """Goodput (requests/s meeting `slo`) at each rate of a sweep, in its order."""
    return [summarize(run.records, run.duration_s, slo).goodput or 0.0 for run, _ in runs]


def best_goodput(runs: Runs, slo: Slo) -> float | None:
    """The highest goodput under `slo` over a sweep's rates; None for no runs."""
    values = goodputs(runs, slo)
    return max(values) if values else None


def attainment(runs: Runs, slo: Slo) -> list[tuple[float, float | None]]:
    """(rate, % of requests meeting `slo`) for each rate of a sweep."""
    return [(run.config.request_rate, summarize(run.records, run.duration_s, slo).slo_attainment_pct)
            for run, _ in runs]


def tpot_p50_at(runs: Runs, rate: float) -> float | None:
    """Median TPOT (ms) of the sweep's run at `rate`; None if there is none."""
    return next((s.tpot_ms.median for run, s in runs if run.config.request_rate == rate), None)


def _ms(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} ms"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} req/s"


def serving_table(results: list[PeerResult], rates: list[float]) -> list[str]:
    low = min(rates) if rates else math.nan
    lines = [f"| server | goodput ({slo_text(SLO_A)}) | goodput ({slo_text(SLO_B)}) | "
             f"TPOT p50 at {rate_label(low)} req/s | goodput A at " + ", ".join(map(rate_label, rates)) + " req/s |",
             "|---|---|---|---|---|"]
    for r in (r for r in results if r.server):
        per_rate = ", ".join(f"{g:.2f}" for g in goodputs(r.sweep, SLO_A)) or "n/a"
        lines.append(f"| {r.name} | {_rate(best_goodput(r.sweep, SLO_A))} | {_rate(best_goodput(r.sweep, SLO_B))} | "
                     f"{_ms(tpot_p50_at(r.sweep, low))} | {per_rate} |")
    return lines


def single_table(results: list[PeerResult]) -> list[str]:
    lines = ["| server | TPOT p50 | ITL p99 | TTFT p50 | requests |", "|---|---|---|---|---|"]
    for r in (r for r in results if r.server):
        s = r.single[0][1] if r.single else None
        if s is None:
            lines.append(f"| {r.name} | n/a | n/a | n/a | 0 |")
            continue
        lines.append(f"| {r.name} | {_ms(s.tpot_ms.median)} | {_ms(s.itl_ms.p99)} | {_ms(s.ttft_ms.median, 0)} | "
                     f"{s.completed} |")
    return lines


def offline_table(results: list[PeerResult]) -> list[str]:
    rows = [r for r in results if r.offline_tokens_per_s is not None]
    base = next((r.offline_tokens_per_s for r in rows if r.name == "llama-server"), None)
    lines = ["| engine | output tokens/s | seconds | vs llama-server |", "|---|---|---|---|"]
    for r in rows:
        assert r.offline_tokens_per_s is not None and r.offline_seconds is not None
        ratio = f"{r.offline_tokens_per_s / base:.2f}x" if base else "n/a"
        lines.append(f"| {r.name} | {r.offline_tokens_per_s:.1f} | {r.offline_seconds:.1f} | {ratio} |")
    return lines


STAGES = ("engine_step", "worker_to_router", "router", "router_to_client")


def stages_table(results: list[PeerResult]) -> list[str]:
    """Each pdserve mode's per-token path at each rate: the medians of pdserve_token_stage_seconds, in ms."""
    lines = ["| server | req/s | engine step | worker to router | router | router to client | all but the step |",
             "|---|---|---|---|---|---|---|"]
    for r in (r for r in results if r.server):
        for run, _ in r.sweep:
            stages = run.token_stages
            if not stages:
                continue
            ms = {k: None if stages.get(k) is None else stages[k] * 1e3 for k in STAGES}  # type: ignore[operator]
            others = [v for k, v in ms.items() if k != "engine_step" and v is not None]
            cells = " | ".join(_ms(ms[k], 2) for k in STAGES)
            lines.append(f"| {r.name} | {rate_label(run.config.request_rate)} | {cells} | "
                         f"{_ms(sum(others), 2) if others else 'n/a'} |")
    return lines


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def targets(results: list[PeerResult], rates: list[float]) -> list[str]:
    """The issue's targets, each figure beside its peer figure from this run."""
    by_name = {r.name: r for r in results}
    llama = by_name.get("llama-server")
    modes = [r for r in results if r.server and r.name.startswith("pdserve") and r.sweep]
    lines = []
    for slo, label in ((SLO_A, "A"), (SLO_B, "B")):
        if not modes:
            break
        best = max(modes, key=lambda r: best_goodput(r.sweep, slo) or 0.0)
        ours, theirs = best_goodput(best.sweep, slo), best_goodput(llama.sweep, slo) if llama else None
        lines.append(f"- goodput under {label} ({slo_text(slo)}): {best.name} {_rate(ours)}, llama-server "
                     f"{_rate(theirs)}: {_ratio(ours, theirs)} (target 1.5x)")
    disagg, colocated = by_name.get("pdserve disagg 1+1"), by_name.get("pdserve colocated")
    if disagg and colocated:
        d, c = best_goodput(disagg.sweep, SLO_B), best_goodput(colocated.sweep, SLO_B)
        lines.append(f"- disagg over colocated under B: {_rate(d)} against {_rate(c)}: {_ratio(d, c)} (target 1.3x)")
    engine = by_name.get("pdserve offline engine")
    low = min(rates) if rates else math.nan
    for r in modes:
        tpot = tpot_p50_at(r.sweep, low)
        run = next((run for run, _ in r.sweep if run.config.request_rate == low), None)
        seconds = run.token_stages.get("engine_step") if run else None
        served = None if seconds is None else seconds * 1e3
        step = engine.decode_step_ms if engine else None
        lines.append(f"- {r.name}, TPOT p50 at {rate_label(low)} req/s: {_ms(tpot)}; against its engine step as "
                     f"served in that run, {_ms(served)}: {_ratio(tpot, served)}; against the offline batch-1 step "
                     f"on one thread, {_ms(step, 2)}: {_ratio(tpot, step)} (target 1.3x)")
    if engine and llama:
        lines.append(f"- offline: {_ratio(engine.offline_tokens_per_s, llama.offline_tokens_per_s)} of llama-server "
                     "(target 1.5x)")
    return lines


def _requests_per_rate(config: dict[str, Any]) -> str:
    seconds = float(config.get("min_duration_s") or 0)
    if not seconds:
        return f"{config['num_requests']} requests"
    return f"max({config['num_requests']}, rate x {seconds:g} s) requests"


def markdown(results: list[PeerResult], config: dict[str, Any], notes: list[str]) -> str:
    """The whole report: the load, the three tables, the greedy check and any errors."""
    rates = [float(x) for x in config["rates"]]
    lines = [
        "# pdserve against llama-server",
        "",
        f"Serving load: `pdserve bench serve` over HTTP /v1/completions, token-id prompts of {config['input_len']} "
        f"tokens, outputs of {config['output_len']}, {_requests_per_rate(config)} per rate, Poisson "
        f"{', '.join(map(rate_label, rates))} req/s. Goodput is the best over the rates.",
        "",
        *serving_table(results, rates),
        "",
        f"One request at a time (input {config['single_input']}, output {config['single_output']}, "
        f"{config['single_requests']} requests):",
        "",
        *single_table(results),
        "",
        f"Offline: {config['offline_prompts']} prompts of {config['offline_input']} tokens, outputs of "
        f"{config['offline_output']}, all submitted at once (pdserve: the offline `LLM` engine; llama-server: "
        "all sent at once to /completion):",
        "",
        *offline_table(results),
        "",
        "The per-token path under the sweep (medians of pdserve_token_stage_seconds over each run's tokens):",
        "",
        *stages_table(results),
        "",
        "Against the serving targets, every figure from this run:",
        "",
        *targets(results, rates),
        "",
        *notes,
        "",
        "Servers:",
        "",
        *(f"- {r.name}: `{r.command}`" for r in results if r.server),
    ]
    for r in results:
        lines += [f"- {r.name} failed: {e}" for e in r.errors]
    return "\n".join(lines) + "\n"


def results_json(results: list[PeerResult], config: dict[str, Any], checks: dict[str, Any]) -> dict[str, Any]:
    peers = {}
    for r in results:
        peers[r.name] = {
            "command": r.command,
            "goodput_slo_a": goodputs(r.sweep, SLO_A),
            "goodput_slo_b": goodputs(r.sweep, SLO_B),
            "sweep": result_json({}, r.sweep)["runs"],
            "single": result_json({}, r.single)["runs"],
            "offline_tokens_per_s": r.offline_tokens_per_s,
            "offline_seconds": r.offline_seconds,
            "decode_step_ms": r.decode_step_ms,
            "errors": r.errors,
        }
    return {"config": config, "slo_a": slo_text(SLO_A), "slo_b": slo_text(SLO_B), "greedy_check": checks,
            "peers": peers}


def plot(path: Path, results: list[PeerResult], title: str) -> None:
    """SLO attainment against rate under both SLOs, one line per server, and the TPOT CDF at the lowest rate."""
    from services.bench.plot import plot_grid

    swept = [r for r in results if r.sweep]
    if not swept:
        return
    low = min(run.config.request_rate for r in swept for run, _ in r.sweep)
    tpot = {r.name: [t for run, _ in r.sweep if run.config.request_rate == low for rec in run.records
                     if rec.success and rec.output_tokens > 1 and (t := rec.tpot_s) is not None] for r in swept}
    plot_grid(path, [[
        ("attainment", ({r.name: attainment(r.sweep, SLO_A) for r in swept}, f"SLO A: {slo_text(SLO_A)}")),
        ("attainment", ({r.name: attainment(r.sweep, SLO_B) for r in swept}, f"SLO B: {slo_text(SLO_B)}")),
        ("cdf", (tpot, f"TPOT at {rate_label(low)} req/s", "TPOT (ms)")),
    ]], title)
