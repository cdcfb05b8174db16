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
    local_prefill_backlog_tokens: int = field(
        default=0, metadata=flag("also prefill on the decode worker when every prefill worker has at least this "
                                 "many prompt tokens from the router still to prefill, and the decode worker fewer "
                                 "of its own (prefill-queue-aware disaggregation); 0: by length only")
    )
    lease_s: float = field(
        default=30.0, metadata=flag("decode reservation lease, s: one not claimed within this is released")
    )
    max_request_bytes: int = 4 * 2**20
    default_max_tokens: int = field(default=16, metadata=flag("max_tokens when a gRPC request sets none"))
    max_queued_requests: int = field(
        default=128, metadata=flag("requests that may wait in the router for room in the decode pool's KV; past "
                                   "them a request is refused at once (HTTP 429 / RESOURCE_EXHAUSTED); -1: no limit")
    )
    kv_overcommit: float = field(
        default=1.0, metadata=flag("admit requests whose worst case KV (prompt + n x max_tokens) adds up to this "
                                   "many times the decode pool's KV; above 1 bets that requests stop early and "
                                   "share prefixes (the workers preempt when they do not); 0: no KV admission")
    )
    request_timeout_s: float | None = field(
        default=None, metadata=flag("deadline of every request, s, from arrival (admission wait included); a "
                                    "shorter gRPC deadline or HTTP X-Request-Timeout header wins")
    )
    slo_ttft_ms: float | None = field(default=None, metadata=flag("time-to-first-token target of the SLO metrics, ms"))
    slo_tpot_ms: float | None = field(
        default=None, metadata=flag("time-per-output-token target of the SLO metrics, ms")
    )
    migration_limit: int = field(
        default=3, metadata=flag("times one request may move to another decode worker when its decode worker "
                                 "dies while streaming it (token replay); 0 turns migration off")
    )
    circuit_breaker_failures: int = field(
        default=3, metadata=flag("failed calls in a row after which a worker gets no new requests until its "
                                 "health poll answers again; 0 turns the breaker off")
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.local_prefill_threshold < 0:
            raise ValueError("local_prefill_threshold must be >= 0")
        if self.local_prefill_backlog_tokens < 0:
            raise ValueError("local_prefill_backlog_tokens must be >= 0")
        if self.lease_s <= 0:
            raise ValueError("lease_s must be positive")
        if self.max_queued_requests < -1:
            raise ValueError("max_queued_requests must be >= 0, or -1 for no limit")
        if not self.kv_overcommit >= 0:
            raise ValueError("kv_overcommit must be >= 0")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError("request_timeout_s must be positive")
        if self.migration_limit < 0:
            raise ValueError("migration_limit must be >= 0")
        if self.circuit_breaker_failures < 0:
            raise ValueError("circuit_breaker_failures must be >= 0")
