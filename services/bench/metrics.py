"""Per-request records and the figures computed from them: throughput, latency percentiles, goodput under an SLO.

Definitions follow vLLM's `bench serve` and DistServe:
- TTFT: send to first token. ITL: gaps between token-bearing chunks. E2E: send to last byte.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request; 0 for a one-token reply.
- goodput: successful requests per second that meet every SLO target; SLO attainment: the share of all
  requests (failed ones included, as misses) that meet every target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
_SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}


@dataclass
class RequestRecord:
    """One request as measured by the client; times in seconds, `start_s`/`scheduled_s` from the run's start."""

    index: int
    conversation: int
    turn: int
    scheduled_s: float
    start_s: float
    success: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.ttft_s is None or self.e2e_s is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """Times rounded to microseconds: a sweep's records stay a few hundred KiB."""
        out = {**asdict(self), "tpot_s": self.tpot_s}
        for key in ("scheduled_s", "start_s", "ttft_s", "e2e_s", "tpot_s"):
            if out[key] is not None:
                out[key] = round(out[key], 6)
        out["itl_s"] = [round(v, 6) for v in self.itl_s]
        return out


@dataclass(frozen=True)
class Slo:
    """Latency targets in milliseconds; None means no target on that figure."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO {name} must be a positive number of milliseconds, got {value}")
        if self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None:
            raise ValueError("an SLO needs at least one target (ttft, tpot or e2e)")

    @classmethod
    def parse(cls, specs: list[str]) -> Slo:
        """From ["ttft:300", "tpot:50"]; keys are ttft, tpot, e2e (or e2el), values milliseconds."""
        values: dict[str, float] = {}
        for spec in specs:
            key, sep, value = spec.partition(":")
            if not sep or key.lower() not in _SLO_KEYS:
                raise ValueError(f"bad --goodput target {spec!r}: expected KEY:MS with KEY in ttft, tpot, e2e")
            try:
                values[_SLO_KEYS[key.lower()] + "_ms"] = float(value)
            except ValueError:
                raise ValueError(f"bad --goodput target {spec!r}: {value!r} is not a number") from None
        return cls(**values)

    def met(self, r: RequestRecord) -> bool:
        if not r.success:
            return False
        checks = ((self.ttft_ms, r.ttft_s), (self.tpot_ms, r.tpot_s), (self.e2e_ms, r.e2e_s))
        return all(target is None or (value is not None and value * 1000 <= target) for target, value in checks)


@dataclass(frozen=True)
class Distribution:
    """Mean, std, median, p90 and p99 in milliseconds; all None when there were no samples."""

    mean: float | None
    std: float | None
    median: float | None
    p90: float | None
    p99: float | None
    count: int

    @classmethod
    def of(cls, seconds: list[float]) -> Distribution:
        if not seconds:
            return cls(None, None, None, None, None, 0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(float(ms.mean()), float(ms.std()), p50, p90, p99, int(ms.size))


@dataclass(frozen=True)
class Summary:
    """Every figure of one run."""

    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    slo: Slo | None
    goodput: float | None
    slo_attainment_pct: float | None
    errors: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo | None = None) -> Summary:
    """Figures over `records` for a run that lasted `duration_s` seconds."""
    if duration_s <= 0:
        raise ValueError(f"a run's duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = (r.error or "unknown error").splitlines()[0][:200]
            errors[key] = errors.get(key, 0) + 1
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    goodput = attainment = None
    if slo is not None:
        met = sum(1 for r in records if slo.met(r))
        goodput = met / duration_s
        attainment = 100.0 * met / len(records) if records else 0.0
    return Summary(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_ms=Distribution.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=Distribution.of([t for r in ok if (t := r.tpot_s) is not None and r.output_tokens > 1]),
        itl_ms=Distribution.of([gap for r in ok for gap in r.itl_s]),
        e2e_ms=Distribution.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo=slo,
        goodput=goodput,
        slo_attainment_pct=attainment,
        errors=errors,
    )
