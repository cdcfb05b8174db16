"""Every Prometheus name, label and bucket pdserve exports, and the code that fills them.

Scrape path (the only one)
--------------------------
Workers are Ray actors in other processes and never serve `/metrics` themselves::

    PrefillWorker / DecodeWorker ──WorkerStats (≈1/s poll)──► router ─► Metrics.update_worker()
    router request path ──first token / token gaps──────────────────► Metrics.observe_first_token()
                        ──FinishedRequestStats (RequestTimes)───────► Metrics.observe_finished()
                        ──TransferStats────────────────────────────► Metrics.observe_transfer()
    Prometheus ──GET http://router:8000/metrics──► Metrics.render()

The router polls every worker about once a second. A `WorkerStats` carries gauges (set as they are)
and `*_delta` counts of events since the previous poll (added to the counters), so no event is
counted twice and none is lost while the worker lives. Every worker series carries the labels
`role` and `worker`. When a poll fails the router calls `mark_worker_down` (worker_up becomes 0,
its gauges are dropped, its counters are kept); when a worker leaves the pool on purpose the router
calls `remove_worker` and every series of that worker disappears.

Request-level series are observed in the router: TTFT and inter-token latency while streaming
(only there, so they are never counted twice), everything else once, when the request ends.
Every series carries `model_name`. Names and meanings follow vLLM's `vllm:` metrics with the
`pdserve_` prefix; the latency bucket lists are vLLM's.

SLO accounting: with `slo_ttft_ms` / `slo_tpot_ms` set, a request finished with "stop" or
"length" whose TTFT and TPOT are within their targets counts in `pdserve_requests_slo_met_total`.
Every finished request counts in `pdserve_requests_finished_total`, so SLO attainment is
`rate(slo_met) / rate(finished)` and goodput is `rate(slo_met)`. A request that has no TPOT
(fewer than two output tokens) meets the TPOT target. With no target set, nothing counts as met.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from services.engine.stats import FinishedRequestStats, TransferStats, WorkerStats

PREFIX = "pdserve_"

ROLES: tuple[str, ...] = ("prefill", "decode", "colocated")
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")
SUCCESS_REASONS: tuple[str, ...] = ("stop", "length")
TRANSFER_FAILURE_REASONS: tuple[str, ...] = ("timeout", "peer_gone", "bad_header", "incompatible")
DISAGG_DECISIONS: tuple[str, ...] = ("remote_prefill", "local_prefill")
STAGES: tuple[str, ...] = ("queue", "prefill", "transfer", "decode_queue", "decode")
SLOS: tuple[str, ...] = ("ttft", "tpot")

# vLLM's bucket lists (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)
# Stages span milliseconds (a transfer) to minutes (a long decode): TTFT's wide list fits.
STAGE_BUCKETS: tuple[float, ...] = TTFT_BUCKETS
# One request's KV hand-off: sub-millisecond over shm up to seconds over TCP.
TRANSFER_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# 4 KiB .. 16 GiB in powers of 4.
TRANSFER_BYTES_BUCKETS: tuple[float, ...] = tuple(float(4**k) for k in range(6, 18))

_MODEL = ("model_name",)
_WORKER = ("model_name", "role", "worker")

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric family. `name` is what PromQL queries (counters end in `_total`)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"metric {self.name!r} must start with {PREFIX!r}")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"metric {self.name!r}: only counters end in '_total'")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name!r}: buckets are for histograms only, and required there")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"metric {self.name!r}: buckets must be strictly increasing")


def _h(name: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> MetricSpec:
    return MetricSpec(PREFIX + name, "histogram", help, labels, buckets)


def _c(name: str, help: str, labels: tuple[str, ...]) -> MetricSpec:
    return MetricSpec(PREFIX + name, "counter", help, labels)


def _g(name: str, help: str, labels: tuple[str, ...]) -> MetricSpec:
    return MetricSpec(PREFIX + name, "gauge", help, labels)


SPECS: tuple[MetricSpec, ...] = (
    # Request latencies, observed in the router.
    _h("time_to_first_token_seconds", "Time from arrival to the first output token.",
       _MODEL, TTFT_BUCKETS),
    _h("inter_token_latency_seconds", "Time between consecutive output tokens of a request.",
       _MODEL, TOKEN_LATENCY_BUCKETS),
    _h("request_time_per_output_token_seconds", "Mean time per output token after the first, per request.",
       _MODEL, TOKEN_LATENCY_BUCKETS),
    _h("e2e_request_latency_seconds", "Time from arrival to the end of the request.",
       _MODEL, REQUEST_LATENCY_BUCKETS),
    _h("request_queue_time_seconds", "Time in the router queue before dispatch.",
       _MODEL, REQUEST_LATENCY_BUCKETS),
    _h("request_prefill_time_seconds", "Time from dispatch to the end of prefill.",
       _MODEL, REQUEST_LATENCY_BUCKETS),
    _h("request_decode_time_seconds", "Time from the start of decode to the end of the request.",
       _MODEL, REQUEST_LATENCY_BUCKETS),
    _h("request_stage_seconds", "Per-request time in each stage (see stage_durations).",
       _MODEL + ("stage",), STAGE_BUCKETS),
    # Request totals.
    _c("prompt_tokens_total", "Prompt tokens of finished requests.", _MODEL),
    _c("prompt_tokens_cached_total", "Prompt tokens of finished requests found in the prefix cache.", _MODEL),
    _c("generation_tokens_total", "Output tokens of finished requests.", _MODEL),
    _c("request_success_total", "Finished requests, by finish reason.", _MODEL + ("finished_reason",)),
    _c("requests_finished_total", "Finished requests, whatever the finish reason.", _MODEL),
    _c("requests_slo_met_total", "Requests finished by stop/length within the TTFT and TPOT targets.",
       _MODEL),
    _c("requests_slo_violations_total", "Finished requests over a latency target, by target.",
       _MODEL + ("slo",)),
    _g("slo_target_seconds", "Configured latency target, by target; absent when not set.",
       _MODEL + ("slo",)),
    _c("disagg_decisions_total", "Where the router prefilled: on a prefill worker, or on the decode worker.",
       _MODEL + ("decision",)),
    # KV transfer.
    _h("kv_transfer_seconds", "Duration of one successful KV hand-off of one request.",
       _MODEL, TRANSFER_SECONDS_BUCKETS),
    _h("kv_transfer_bytes", "Bytes moved by one successful KV hand-off of one request.",
       _MODEL, TRANSFER_BYTES_BUCKETS),
    _c("kv_transfer_failures_total", "Failed KV hand-offs, by reason.", _MODEL + ("reason",)),
    # Workers, polled as WorkerStats.
    _g("worker_up", "1 while the router's last poll of the worker succeeded, else 0.", _WORKER),
    _g("num_requests_running", "Requests in the worker's running batch.", _WORKER),
    _g("num_requests_waiting", "Requests waiting in the worker's scheduler queue.", _WORKER),
    _g("num_requests_waiting_for_remote_kv", "Requests on a decode worker waiting for their KV.", _WORKER),
    _g("queued_prefill_tokens", "Prompt tokens queued for prefill on the worker.", _WORKER),
    _g("kv_cache_usage_perc", "KV-cache usage of the worker; 1 means 100 percent.", _WORKER),
    _c("prefix_cache_queries_total", "Prefix-cache queries, in tokens queried.", _WORKER),
    _c("prefix_cache_hits_total", "Prefix-cache hits, in tokens found cached.", _WORKER),
    _c("num_preemptions_total", "Requests preempted by the worker's scheduler.", _WORKER),
    _c("kv_reservations_expired_total", "KV block reservations whose lease expired unused.", _WORKER),
)

METRIC_NAMES: frozenset[str] = frozenset(s.name for s in SPECS)
"""Every family name as PromQL queries it; histograms add `_bucket`, `_sum` and `_count`."""
HISTOGRAM_NAMES: frozenset[str] = frozenset(s.name for s in SPECS if s.kind == "histogram")
WORKER_METRIC_NAMES: frozenset[str] = frozenset(s.name for s in SPECS if s.labels == _WORKER)
_WORKER_GAUGES: tuple[str, ...] = tuple(
    s.name for s in SPECS if s.labels == _WORKER and s.kind == "gauge" and s.name != PREFIX + "worker_up"
)

_Family = Counter | Gauge | Histogram


def _build(spec: MetricSpec, registry: CollectorRegistry) -> _Family:
    if spec.kind == "counter":
        return Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _check_worker(worker: str, role: str) -> None:
    _check_choice("role", role, ROLES)
    if not worker:
        raise ValueError("the worker name must be non-empty")


def _check_seconds(what: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{what} must be a non-negative number of seconds, got {value!r}")


class Metrics:
    """The router's Prometheus metrics. Thread-safe; every method validates before it records.

    Each instance owns its registry (a fresh one unless given), so several routers or tests can
    live in one process.
    """

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = "",
                 slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> None:
        for what, slo in (("slo_ttft_ms", slo_ttft_ms), ("slo_tpot_ms", slo_tpot_ms)):
            if slo is not None and not slo > 0:
                raise ValueError(f"{what} must be a positive number of milliseconds or None, got {slo!r}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        self.slo_ttft_s = None if slo_ttft_ms is None else slo_ttft_ms / 1000.0
        self.slo_tpot_s = None if slo_tpot_ms is None else slo_tpot_ms / 1000.0
        self._lock = threading.Lock()
        self._workers: dict[str, str] = {}  # worker -> role, of workers with series
        self._families: dict[str, _Family] = {s.name: _build(s, self.registry) for s in SPECS}
        self._init_series()

    def _init_series(self) -> None:
        """Create every router-level series at zero, so rate() reads 0 rather than "no data"."""
        m = self.model_name
        for spec in SPECS:
            if spec.labels == _MODEL and spec.name != PREFIX + "requests_slo_met_total":
                self._families[spec.name].labels(m)
        for stage in STAGES:
            self._histogram("request_stage_seconds").labels(m, stage)
        for reason in FINISH_REASONS:
            self._counter("request_success_total").labels(m, reason)
        for reason in TRANSFER_FAILURE_REASONS:
            self._counter("kv_transfer_failures_total").labels(m, reason)
        for decision in DISAGG_DECISIONS:
            self._counter("disagg_decisions_total").labels(m, decision)
        for slo, target in (("ttft", self.slo_ttft_s), ("tpot", self.slo_tpot_s)):
            if target is not None:
                self._gauge("slo_target_seconds").labels(m, slo).set(target)
                self._counter("requests_slo_violations_total").labels(m, slo)
        if self.slo_ttft_s is not None or self.slo_tpot_s is not None:
            self._counter("requests_slo_met_total").labels(m)

    def _counter(self, name: str) -> Counter:
        family = self._families[PREFIX + name]
        assert isinstance(family, Counter)
        return family

    def _gauge(self, name: str) -> Gauge:
        family = self._families[PREFIX + name]
        assert isinstance(family, Gauge)
        return family

    def _histogram(self, name: str) -> Histogram:
        family = self._families[PREFIX + name]
        assert isinstance(family, Histogram)
        return family

    # -- workers -----------------------------------------------------------------------------

    def update_worker(self, stats: WorkerStats) -> None:
        """Record one poll: set the worker's gauges, add its `*_delta` counts, mark it up."""
        _check_worker(stats.worker, stats.role)
        counts = {name: getattr(stats, name) for name in (
            "num_running", "num_waiting", "num_waiting_for_remote_kv", "num_free_blocks", "num_total_blocks",
            "queued_prefill_tokens", "prefix_cache_queries_delta", "prefix_cache_hits_delta",
            "num_preemptions_delta", "kv_reservations_expired_delta")}
        bad = {name: v for name, v in counts.items() if not v >= 0}
        if bad:
            raise ValueError(f"worker {stats.worker!r}: counts must be non-negative, got {bad}")
        if stats.num_free_blocks > stats.num_total_blocks:
            raise ValueError(f"worker {stats.worker!r}: {stats.num_free_blocks} free blocks > "
                             f"{stats.num_total_blocks} total")
        key = (self.model_name, stats.role, stats.worker)
        with self._lock:
            old_role = self._workers.get(stats.worker)
            if old_role is not None and old_role != stats.role:
                self._remove_locked(stats.worker, old_role)
            self._workers[stats.worker] = stats.role
            self._gauge("worker_up").labels(*key).set(1)
            self._gauge("num_requests_running").labels(*key).set(stats.num_running)
            self._gauge("num_requests_waiting").labels(*key).set(stats.num_waiting)
            self._gauge("num_requests_waiting_for_remote_kv").labels(*key).set(stats.num_waiting_for_remote_kv)
            self._gauge("queued_prefill_tokens").labels(*key).set(stats.queued_prefill_tokens)
            self._gauge("kv_cache_usage_perc").labels(*key).set(stats.kv_cache_usage)
            self._counter("prefix_cache_queries_total").labels(*key).inc(stats.prefix_cache_queries_delta)
            self._counter("prefix_cache_hits_total").labels(*key).inc(stats.prefix_cache_hits_delta)
            self._counter("num_preemptions_total").labels(*key).inc(stats.num_preemptions_delta)
            self._counter("kv_reservations_expired_total").labels(*key).inc(stats.kv_reservations_expired_delta)

    def mark_worker_down(self, worker: str, role: str) -> None:
        """A poll failed: worker_up becomes 0 and the stale gauges go; counters stay."""
        _check_worker(worker, role)
        key = (self.model_name, role, worker)
        with self._lock:
            old_role = self._workers.get(worker)
            if old_role is not None and old_role != role:
                self._remove_locked(worker, old_role)
            self._workers[worker] = role
            self._gauge("worker_up").labels(*key).set(0)
            for name in _WORKER_GAUGES:
                self._drop(self._families[name], key)

    def remove_worker(self, worker: str, role: str) -> None:
        """The worker left the pool on purpose: drop every series that names it."""
        _check_worker(worker, role)
        with self._lock:
            self._remove_locked(worker, role)

    def _remove_locked(self, worker: str, role: str) -> None:
        key = (self.model_name, role, worker)
        for name in WORKER_METRIC_NAMES:
            self._drop(self._families[name], key)
        if self._workers.get(worker) == role:
            del self._workers[worker]

    @staticmethod
    def _drop(family: _Family, key: tuple[str, ...]) -> None:
        try:
            family.remove(*key)
        except KeyError:
            pass  # the series was never created

    # -- requests ----------------------------------------------------------------------------

    def observe_first_token(self, ttft_s: float) -> None:
        """Streaming: the first token of a request reached the router, `ttft_s` after arrival."""
        _check_seconds("ttft_s", ttft_s)
        self._histogram("time_to_first_token_seconds").labels(self.model_name).observe(ttft_s)

    def observe_token_gap(self, itl_s: float) -> None:
        """Streaming: time between two consecutive output tokens of one request."""
        _check_seconds("itl_s", itl_s)
        self._histogram("inter_token_latency_seconds").labels(self.model_name).observe(itl_s)

    def observe_finished(self, stats: FinishedRequestStats) -> None:
        """A request ended: latencies, stage breakdown, token totals, finish reason and SLO.

        TTFT and inter-token latency are not observed here; the streaming calls did that.
        """
        _check_choice("finish_reason", stats.finish_reason, FINISH_REASONS)
        for what in ("prompt_tokens", "generation_tokens", "cached_tokens"):
            if not getattr(stats, what) >= 0:
                raise ValueError(f"{what} must be non-negative, got {getattr(stats, what)!r}")
        if stats.cached_tokens > stats.prompt_tokens:
            raise ValueError(f"cached_tokens {stats.cached_tokens} > prompt_tokens {stats.prompt_tokens}")
        stages = stage_durations(stats)
        e2e, tpot, m = stats.e2e, stats.tpot, self.model_name
        for what, value in (("e2e", e2e), ("tpot", tpot), ("ttft", stats.ttft)):
            if value is not None:
                _check_seconds(what, value)

        if e2e is not None:
            self._histogram("e2e_request_latency_seconds").labels(m).observe(e2e)
        if tpot is not None:
            self._histogram("request_time_per_output_token_seconds").labels(m).observe(tpot)
        for stage, seconds in stages.items():
            self._histogram("request_stage_seconds").labels(m, stage).observe(seconds)
        for stage in ("queue", "prefill", "decode"):
            if stage in stages:
                self._histogram(f"request_{stage}_time_seconds").labels(m).observe(stages[stage])
        self._counter("prompt_tokens_total").labels(m).inc(stats.prompt_tokens)
        self._counter("prompt_tokens_cached_total").labels(m).inc(stats.cached_tokens)
        self._counter("generation_tokens_total").labels(m).inc(stats.generation_tokens)
        self._counter("request_success_total").labels(m, stats.finish_reason).inc()
        self._counter("requests_finished_total").labels(m).inc()
        self._observe_slo(stats)

    def _observe_slo(self, stats: FinishedRequestStats) -> None:
        if self.slo_ttft_s is None and self.slo_tpot_s is None:
            return
        ttft, tpot, m = stats.ttft, stats.tpot, self.model_name
        ttft_ok = self.slo_ttft_s is None or (ttft is not None and ttft <= self.slo_ttft_s)
        tpot_ok = self.slo_tpot_s is None or tpot is None or tpot <= self.slo_tpot_s
        if not ttft_ok:
            self._counter("requests_slo_violations_total").labels(m, "ttft").inc()
        if not tpot_ok:
            self._counter("requests_slo_violations_total").labels(m, "tpot").inc()
        if ttft_ok and tpot_ok and stats.finish_reason in SUCCESS_REASONS:
            self._counter("requests_slo_met_total").labels(m).inc()

    # -- disaggregation ----------------------------------------------------------------------

    def observe_transfer(self, stats: TransferStats) -> None:
        """One KV hand-off ended: a success feeds the histograms, a failure its reason counter."""
        _check_seconds("TransferStats.seconds", stats.seconds)
        if not stats.num_bytes >= 0:
            raise ValueError(f"TransferStats.num_bytes must be non-negative, got {stats.num_bytes!r}")
        if stats.failure_reason is not None:
            _check_choice("transfer failure reason", stats.failure_reason, TRANSFER_FAILURE_REASONS)
            self._counter("kv_transfer_failures_total").labels(self.model_name, stats.failure_reason).inc()
            return
        self._histogram("kv_transfer_seconds").labels(self.model_name).observe(stats.seconds)
        self._histogram("kv_transfer_bytes").labels(self.model_name).observe(stats.num_bytes)

    def record_disagg_decision(self, decision: str) -> None:
        """The router chose where to prefill: "remote_prefill" or "local_prefill"."""
        _check_choice("disagg decision", decision, DISAGG_DECISIONS)
        self._counter("disagg_decisions_total").labels(self.model_name, decision).inc()

    def render(self) -> bytes:
        """The text exposition of every series, served as `/metrics` with `content_type`."""
        return generate_latest(self.registry)


def stage_durations(stats: FinishedRequestStats) -> dict[str, float]:
    """Seconds spent in each stage whose start and end are both known.

        arrival ─queue─► dispatched ─prefill─► prefill_done ─transfer─► kv_ready
                ─decode_queue─► decode_start ─decode─► finished
    With no transfer (colocated, or local prefill), decode_queue starts at prefill_done.
    Raises ValueError when a known stage would be negative (timestamps out of order).
    """
    t = stats.times
    bounds: dict[str, tuple[float | None, float | None]] = {
        "queue": (t.arrival, t.dispatched),
        "prefill": (t.dispatched, t.prefill_done),
        "transfer": (t.prefill_done, t.kv_ready),
        "decode_queue": (t.kv_ready if t.kv_ready is not None else t.prefill_done, t.decode_start),
        "decode": (t.decode_start, t.finished),
    }
    out: dict[str, float] = {}
    for stage, (start, end) in bounds.items():
        if start is None or end is None:
            continue
        if end < start:
            raise ValueError(f"RequestTimes out of order: stage {stage!r} ends at {end}, before {start}")
        out[stage] = end - start
    return out
