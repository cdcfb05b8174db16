"""The router's Prometheus metrics: stats records in, the `/metrics` exposition out.

Names, labels and buckets are declared in metric_specs; the series of polled workers are kept by
metric_workers.

Scrape path (the only one)
--------------------------
Workers are Ray actors in other processes and never serve `/metrics` themselves::

    PrefillWorker / DecodeWorker ──WorkerStats (≈1/s poll)──► router ─► Metrics.update_worker()
    router request path ──first token / token gaps──────────────────► Metrics.observe_first_token()
                        ──output tokens as they stream─────────────► Metrics.observe_generated_tokens()
                        ──FinishedRequestStats (RequestTimes)───────► Metrics.observe_finished()
                        ──a request that ends in an error──────────► Metrics.observe_failure()
                        ──TransferStats────────────────────────────► Metrics.observe_transfer()
                        ──admission account, deadlines passed─────► Metrics.set_admission(), observe_deadline_exceeded()
                        ──a request moved off a dead decode worker─► Metrics.observe_migration()
                        ──a prompt prefilled again on a live worker─► Metrics.observe_reprefill()
    Prometheus ──GET http://router:8000/metrics──► Metrics.render()

The router polls every worker about once a second. When a poll fails the router calls
`mark_worker_down` (worker_up becomes 0, its gauges are dropped, its counters are kept); when a
worker leaves the pool on purpose the router calls `remove_worker` and every series of that worker
disappears.

Request-level series are observed in the router: TTFT, inter-token latency and generation tokens while
streaming (only there, so they are never counted twice), everything else once, when the request ends. A
request that fails after the router took it finishes with reason "error" and counts in
`pdserve_request_failures_total` by reason; one refused at admission counts there only.

SLO accounting: with `slo_ttft_ms` / `slo_tpot_ms` set, a request finished with "stop" or
"length" whose TTFT and TPOT are within their targets counts in `pdserve_requests_slo_met_total`.
Every finished request counts in `pdserve_requests_finished_total`, so SLO attainment is
`rate(slo_met) / rate(finished)` and goodput is `rate(slo_met)`. A request that has no TPOT
(fewer than two output tokens) meets the TPOT target. With no target set, nothing counts as met.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.engine.stats import FinishedRequestStats, TransferStats, WorkerStats
from services.router.metric_families import Families
from services.router.metric_specs import (
    DEADLINE_STAGES,
    DISAGG_DECISIONS,
    FINISH_REASONS,
    MODEL_LABELS,
    PREFIX,
    REQUEST_FAILURE_REASONS,
    SPECS,
    STAGES,
    SUCCESS_REASONS,
    TOKEN_STAGES,
    TRANSFER_FAILURE_REASONS,
    check_choice,
)
from services.router.metric_workers import WorkerSeries


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
        self._families = Families(self.registry)
        self._workers = WorkerSeries(self._families, model_name)
        self._init_series()

    def _init_series(self) -> None:
        """Create every router-level series at zero, so rate() reads 0 rather than "no data"."""
        m, f = self.model_name, self._families
        for spec in SPECS:
            if spec.labels == MODEL_LABELS and spec.name != PREFIX + "requests_slo_met_total":
                f.family(spec.name).labels(m)
        for stage in STAGES:
            f.histogram("request_stage_seconds").labels(m, stage)
        for stage in TOKEN_STAGES:
            f.histogram("token_stage_seconds").labels(m, stage)
        for reason in FINISH_REASONS:
            f.counter("request_success_total").labels(m, reason)
        for reason in TRANSFER_FAILURE_REASONS:
            f.counter("kv_transfer_failures_total").labels(m, reason)
        for reason in REQUEST_FAILURE_REASONS:
            f.counter("request_failures_total").labels(m, reason)
        for decision in DISAGG_DECISIONS:
            f.counter("disagg_decisions_total").labels(m, decision)
        for stage in DEADLINE_STAGES:
            f.counter("request_deadline_exceeded_total").labels(m, stage)
        for slo, target in (("ttft", self.slo_ttft_s), ("tpot", self.slo_tpot_s)):
            if target is not None:
                f.gauge("slo_target_seconds").labels(m, slo).set(target)
                f.counter("requests_slo_violations_total").labels(m, slo)
        if self.slo_ttft_s is not None or self.slo_tpot_s is not None:
            f.counter("requests_slo_met_total").labels(m)

    # -- workers -----------------------------------------------------------------------------

    def update_worker(self, stats: WorkerStats) -> None:
        """Record one poll: set the worker's gauges, add its `*_delta` counts, mark it up."""
        self._workers.update(stats)

    def mark_worker_down(self, worker: str, role: str) -> None:
        """A poll failed: worker_up becomes 0 and the stale gauges go; counters stay."""
        self._workers.mark_down(worker, role)

    def remove_worker(self, worker: str, role: str) -> None:
        """The worker left the pool on purpose: drop every series that names it."""
        self._workers.remove(worker, role)

    # -- requests ----------------------------------------------------------------------------

    def observe_first_token(self, ttft_s: float) -> None:
        """Streaming: the first token of a request reached the router, `ttft_s` after arrival."""
        _check_seconds("ttft_s", ttft_s)
        self._families.histogram("time_to_first_token_seconds").labels(self.model_name).observe(ttft_s)

    def observe_token_gap(self, itl_s: float) -> None:
        """Streaming: time between two consecutive output tokens of one request."""
        _check_seconds("itl_s", itl_s)
        self._families.histogram("inter_token_latency_seconds").labels(self.model_name).observe(itl_s)

    def observe_token_stage(self, stage: str, seconds_per_token: float, count: int) -> None:
        """`count` generated tokens each spent `seconds_per_token` in `stage` (TOKEN_STAGES)."""
        check_choice("token stage", stage, TOKEN_STAGES)
        _check_seconds("seconds_per_token", seconds_per_token)
        series = self._families.histogram("token_stage_seconds").labels(self.model_name, stage)
        for _ in range(count):
            series.observe(seconds_per_token)

    def observe_generated_tokens(self, count: int) -> None:
        """Streaming: `count` more output tokens of a request reached the router."""
        if not count >= 0:
            raise ValueError(f"count must be non-negative, got {count!r}")
        self._families.counter("generation_tokens_total").labels(self.model_name).inc(count)

    def observe_failure(self, reason: str) -> None:
        """A request ended in an error instead of a completion (reason: one of REQUEST_FAILURE_REASONS)."""
        check_choice("request failure reason", reason, REQUEST_FAILURE_REASONS)
        self._families.counter("request_failures_total").labels(self.model_name, reason).inc()

    def observe_finished(self, stats: FinishedRequestStats) -> None:
        """A request ended: latencies, stage breakdown, prompt token totals, finish reason and SLO.

        TTFT, inter-token latency and generation tokens are not observed here; the streaming calls did that.
        """
        check_choice("finish_reason", stats.finish_reason, FINISH_REASONS)
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

        histogram, counter = self._families.histogram, self._families.counter
        if e2e is not None:
            histogram("e2e_request_latency_seconds").labels(m).observe(e2e)
        if tpot is not None:
            histogram("request_time_per_output_token_seconds").labels(m).observe(tpot)
        for stage, seconds in stages.items():
            histogram("request_stage_seconds").labels(m, stage).observe(seconds)
        for stage in ("queue", "prefill", "decode"):
            if stage in stages:
                histogram(f"request_{stage}_time_seconds").labels(m).observe(stages[stage])
        counter("prompt_tokens_total").labels(m).inc(stats.prompt_tokens)
        counter("prompt_tokens_cached_total").labels(m).inc(stats.cached_tokens)
        counter("request_success_total").labels(m, stats.finish_reason).inc()
        counter("requests_finished_total").labels(m).inc()
        self._observe_slo(stats)

    def _observe_slo(self, stats: FinishedRequestStats) -> None:
        if self.slo_ttft_s is None and self.slo_tpot_s is None:
            return
        ttft, tpot, m = stats.ttft, stats.tpot, self.model_name
        ttft_ok = self.slo_ttft_s is None or (ttft is not None and ttft <= self.slo_ttft_s)
        tpot_ok = self.slo_tpot_s is None or tpot is None or tpot <= self.slo_tpot_s
        violations = self._families.counter("requests_slo_violations_total")
        if not ttft_ok:
            violations.labels(m, "ttft").inc()
        if not tpot_ok:
            violations.labels(m, "tpot").inc()
        if ttft_ok and tpot_ok and stats.finish_reason in SUCCESS_REASONS:
            self._families.counter("requests_slo_met_total").labels(m).inc()

    def observe_migration(self) -> None:
        """A request's decode worker died mid-stream and the request moved to another one (token replay)."""
        self._families.counter("request_migrations_total").labels(self.model_name).inc()

    def observe_reprefill(self) -> None:
        """A request's prefill worker died before its first token and another one prefills it again."""
        self._families.counter("request_reprefills_total").labels(self.model_name).inc()

    def set_admission(self, admitted: int, kv_tokens: int, queued: int, capacity_tokens: int) -> None:
        """The router's admission account changed (services/router/admission.py)."""
        m, gauge = self.model_name, self._families.gauge
        gauge("router_admitted_requests").labels(m).set(admitted)
        gauge("router_admitted_kv_tokens").labels(m).set(kv_tokens)
        gauge("router_queued_requests").labels(m).set(queued)
        gauge("router_kv_capacity_tokens").labels(m).set(capacity_tokens)

    def observe_deadline_exceeded(self, stage: str) -> None:
        """A request's deadline passed while it was in `stage` (one of DEADLINE_STAGES)."""
        check_choice("deadline stage", stage, DEADLINE_STAGES)
        self._families.counter("request_deadline_exceeded_total").labels(self.model_name, stage).inc()

    # -- disaggregation ----------------------------------------------------------------------

    def observe_transfer(self, stats: TransferStats) -> None:
        """One KV hand-off ended: a success feeds the histograms, a failure its reason counter."""
        _check_seconds("TransferStats.seconds", stats.seconds)
        if not stats.num_bytes >= 0:
            raise ValueError(f"TransferStats.num_bytes must be non-negative, got {stats.num_bytes!r}")
        if stats.failure_reason is not None:
            check_choice("transfer failure reason", stats.failure_reason, TRANSFER_FAILURE_REASONS)
            failures = self._families.counter("kv_transfer_failures_total")
            failures.labels(self.model_name, stats.failure_reason).inc()
            return
        labels = (self.model_name, stats.transport or "unknown")
        self._families.histogram("kv_transfer_seconds").labels(*labels).observe(stats.seconds)
        self._families.histogram("kv_transfer_bytes").labels(*labels).observe(stats.num_bytes)

    def record_disagg_decision(self, decision: str) -> None:
        """The router chose where to prefill: "remote_prefill", "local_prefill" (a short uncached prompt) or
        "local_prefill_backlog" (a backlog in the prefill pool)."""
        check_choice("disagg decision", decision, DISAGG_DECISIONS)
        self._families.counter("disagg_decisions_total").labels(self.model_name, decision).inc()

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
