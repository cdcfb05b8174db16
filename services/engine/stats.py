"""Plain stats records produced by the engine and the workers.

Nothing here imports prometheus_client: the router's metrics module turns these
records into Prometheus series (metrics flow one way).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerStats:
    """One worker's state, polled by the router about once a second.

    Gauges are current values; the `*_delta` counters count events since the
    previous poll, so the router can add them to its Prometheus counters.
    """

    worker: str
    role: str  # "prefill" | "decode" | "colocated"
    num_running: int = 0
    num_waiting: int = 0
    num_waiting_for_remote_kv: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    queued_prefill_tokens: int = 0
    prefix_cache_queries_delta: int = 0
    prefix_cache_hits_delta: int = 0
    num_preemptions_delta: int = 0
    kv_reservations_expired_delta: int = 0

    @property
    def kv_cache_usage(self) -> float:
        if self.num_total_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


@dataclass
class RequestTimes:
    """Timestamps (time.monotonic seconds) of one request's stages, as seen by the router.

        arrival ─ queue ─► dispatched ─ prefill ─► prefill_done ─ transfer ─► kv_ready
                ─ decode queue ─► decode_start ─ decode ─► finished
    In colocated mode, or when the decode worker prefills locally, transfer is empty.
    """

    arrival: float
    dispatched: float | None = None
    prefill_done: float | None = None
    kv_ready: float | None = None
    decode_start: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class FinishedRequestStats:
    """Everything the metrics module needs about a request that ended."""

    finish_reason: str  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    times: RequestTimes

    @property
    def ttft(self) -> float | None:
        t = self.times
        return None if t.first_token is None else t.first_token - t.arrival

    @property
    def e2e(self) -> float | None:
        t = self.times
        return None if t.finished is None else t.finished - t.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        t = self.times
        if t.first_token is None or t.finished is None or self.generation_tokens < 2:
            return None
        return (t.finished - t.first_token) / (self.generation_tokens - 1)


@dataclass
class TransferStats:
    """One completed or failed KV hand-off of one request."""

    seconds: float
    num_bytes: int
    failure_reason: str | None = None  # None on success; else one of services.transfer.errors.FAILURE_REASONS
    # What the KV crossed (a success's): "shm", the UCX transports ("tcp", "rc_mlx5+tcp", ...), or "unknown"
    # when the decode worker never said (the request ended at its first token).
    transport: str = "unknown"
