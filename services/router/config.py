"""The router's configuration. What to do when a KV hand-off fails is TransferConfig.failure_policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.config_flags import flag

MODES = ("disagg", "colocated")


@dataclass(frozen=True)
class RouterConfig:
    mode: str = field(default="disagg", metadata=flag("separate prefill and decode pools, or one pool of "
                                                      "workers that do both", choices=MODES))
    prefill_policy: str = field(default="prefix_affinity", metadata=flag("how a prefill worker is chosen"))
    decode_policy: str = field(default="least_loaded", metadata=flag("how a decode worker is chosen"))
    local_prefill_threshold: int = field(
        default=32, metadata=flag("prefill on the decode worker when the uncached prompt part is shorter than this")
    )
    lease_s: float = field(
        default=30.0, metadata=flag("decode reservation lease, s: one not claimed within this is released")
    )
    max_request_bytes: int = 4 * 2**20
    default_max_tokens: int = field(default=16, metadata=flag("max_tokens when a gRPC request sets none"))
    slo_ttft_ms: float | None = field(default=None, metadata=flag("time-to-first-token target of the SLO metrics, ms"))
    slo_tpot_ms: float | None = field(
        default=None, metadata=flag("time-per-output-token target of the SLO metrics, ms")
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.local_prefill_threshold < 0:
            raise ValueError("local_prefill_threshold must be >= 0")
        if self.lease_s <= 0:
            raise ValueError("lease_s must be positive")
