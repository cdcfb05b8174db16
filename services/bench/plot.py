"""Latency CDFs and SLO attainment against request rate, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.bench.load import RunResult
from services.bench.metrics import Summary
from services.bench.report import rate_label

# (title, seconds of one record, or None)
_LATENCIES = (
    ("TTFT", lambda r: r.ttft_s),
    ("TPOT", lambda r: r.tpot_s if r.output_tokens > 1 else None),
    ("E2E latency", lambda r: r.e2e_s),
)


def _figure(ncols: int, nrows: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    return fig, axes


def draw_cdf(ax: Any, seconds: Sequence[float], label: str) -> None:
    values = sorted(v * 1000.0 for v in seconds)
    if values:
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=label)


def draw_attainment(ax: Any, series: dict[str, list[tuple[float, float | None]]], title: str) -> None:
    """One line per series of (rate, attainment %); an infinite rate is drawn one step past the largest finite."""
    finite = [r for points in series.values() for r, _ in points if not math.isinf(r)]
    inf_x = max(finite) * 1.5 if finite else 1.0
    for label, points in series.items():
        xs = [inf_x if math.isinf(r) else r for r, a in points if a is not None]
        ys = [a for _, a in points if a is not None]
        ax.plot(xs, ys, marker="o", label=label)
    rates = sorted({r for points in series.values() for r, _ in points})
    ax.set_xticks([inf_x if math.isinf(r) else r for r in rates], [rate_label(r) for r in rates])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _finish(fig: Any, path: str | Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_serve(path: str | Path, runs: list[tuple[RunResult, Summary]], title: str) -> None:
    """Latency CDFs (one line per rate) and, for a sweep with an SLO, attainment against rate."""
    sweep = len(runs) > 1 and all(s.slo_attainment_pct is not None for _, s in runs)
    fig, axes = _figure(len(_LATENCIES) + (1 if sweep else 0))
    for col, (name, get) in enumerate(_LATENCIES):
        ax = axes[0][col]
        for run, _ in runs:
            values = [v for r in run.records if r.success and (v := get(r)) is not None]
            draw_cdf(ax, values, f"{rate_label(run.config.request_rate)} req/s")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if sweep:
        points = [(run.config.request_rate, s.slo_attainment_pct) for run, s in runs]
        draw_attainment(axes[0][-1], {"attainment": points}, "SLO attainment")
    _finish(fig, path, title)


def plot_grid(path: str | Path, panels: list[list[tuple[str, Any]]], title: str) -> None:
    """A grid of panels, each a (kind, data) pair: ("attainment", (series, title)) or ("cdf", (lines, title,
    xlabel)) where lines maps a label to seconds."""
    fig, axes = _figure(max(len(row) for row in panels), len(panels))
    for i, row in enumerate(panels):
        for j, (kind, data) in enumerate(row):
            ax = axes[i][j]
            if kind == "attainment":
                draw_attainment(ax, *data)
            elif kind == "cdf":
                lines, panel_title, xlabel = data
                for label, seconds in lines.items():
                    draw_cdf(ax, seconds, label)
                ax.set_title(panel_title)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("fraction of requests")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            else:
                raise ValueError(f"unknown panel kind {kind!r}")
    _finish(fig, path, title)
