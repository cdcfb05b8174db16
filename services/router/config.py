"""The router's configuration."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("disagg", "colocated")


@dataclass(frozen=True)
class RouterConfig:
    mode: str = "disagg"
    prefill_policy: str = "prefix_affinity"
    decode_policy: str = "least_loaded"
    # Prompts whose uncached part is shorter than this are prefilled on the decode worker.
    local_prefill_threshold: int = 32
    lease_s: float = 30.0  # a decode reservation not claimed within this is released
    failure_policy: str = "recompute"  # or "fail": a failed hand-off is answered UNAVAILABLE
    max_request_bytes: int = 4 * 2**20
    default_max_tokens: int = 16
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.failure_policy not in ("recompute", "fail"):
            raise ValueError(f"failure_policy must be 'recompute' or 'fail', got {self.failure_policy!r}")
        if self.local_prefill_threshold < 0:
            raise ValueError("local_prefill_threshold must be >= 0")
        if self.lease_s <= 0:
            raise ValueError("lease_s must be positive")
