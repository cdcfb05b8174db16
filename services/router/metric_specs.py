"""Every Prometheus name, label, label value and bucket pdserve exports, as one table of MetricSpec.

Pure Python (no prometheus_client), so dashboards, alert rules and their tests can check names against
it. Names and meanings follow vLLM's `vllm:` metrics with the `pdserve_` prefix; the latency bucket
lists are vLLM's. Every series carries `model_name`; worker series add `role` and `worker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "pdserve_"

ROLES: tuple[str, ...] = ("prefill", "decode", "colocated")
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")
SUCCESS_REASONS: tuple[str, ...] = ("stop", "length")
# services.transfer.errors.FAILURE_REASONS, written out: importing services.transfer runs its package, which
# imports torch, and this table stays pure Python. tests/unit/test_metrics.py checks that the two lists agree.
TRANSFER_FAILURE_REASONS: tuple[str, ...] = ("timeout", "peer_gone", "bad_header", "incompatible")
# Why a request the router took ended in an error instead of a completion (failures.failure_reason):
#   invalid_request     the router refused it: prompt over the context, token id outside the vocabulary, too many
#                       stop strings, a request id in use, ... (HTTP 400 / INVALID_ARGUMENT)
#   resource_exhausted  refused at admission, the router's queue being full (--max-queued-requests), or no decode
#                       worker had room for its KV (HTTP 429 / RESOURCE_EXHAUSTED)
#   unavailable         no worker alive and taking requests, or the server draining (HTTP 503 / UNAVAILABLE)
#   transfer_failed     its KV hand-off failed under the "fail" policy (503 / UNAVAILABLE)
#   worker_failed       a worker died or failed while it ran the request (503 / UNAVAILABLE)
#   internal            an error the router did not expect; it is logged (503 / UNAVAILABLE)
# A request the client cancels, or whose deadline passes, is not a failure: it finishes with reason "abort" (one
# whose deadline passed counts in request_deadline_exceeded_total by the stage it was in: DEADLINE_STAGES).
REQUEST_FAILURE_REASONS: tuple[str, ...] = (
    "invalid_request", "resource_exhausted", "unavailable", "transfer_failed", "worker_failed", "internal",
)
DISAGG_DECISIONS: tuple[str, ...] = ("remote_prefill", "local_prefill", "local_prefill_backlog")
DEADLINE_STAGES: tuple[str, ...] = ("admission", "running")
STAGES: tuple[str, ...] = ("queue", "prefill", "transfer", "decode_queue", "decode")
SLOS: tuple[str, ...] = ("ttft", "tpot")
# A generated token's way to the client (services/router/output.py).
TOKEN_STAGES: tuple[str, ...] = ("engine_step", "worker_to_router", "router", "router_to_client")

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
# Per token: tens of microseconds (the router's part) up to a slow engine step.
TOKEN_STAGE_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
# 4 KiB .. 16 GiB in powers of 4.
TRANSFER_BYTES_BUCKETS: tuple[float, ...] = tuple(float(4**k) for k in range(6, 18))

MODEL_LABELS: tuple[str, ...] = ("model_name",)
WORKER_LABELS: tuple[str, ...] = ("model_name", "role", "worker")

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


_MODEL = MODEL_LABELS
_WORKER = WORKER_LABELS

SPECS: tuple[MetricSpec, ...] = (
    # Request latencies, observed in the router.
    _h("time_to_first_token_seconds", "Time from arrival to the first output token.",
       _MODEL, TTFT_BUCKETS),
    _h("inter_token_latency_seconds", "Time between consecutive output tokens of a request.",
       _MODEL, TOKEN_LATENCY_BUCKETS),
    _h("token_stage_seconds", "Time per generated token in each stage of its way to the client: engine_step, "
       "worker_to_router, router, router_to_client.", _MODEL + ("stage",), TOKEN_STAGE_BUCKETS),
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
    _c("generation_tokens_total", "Output tokens sent to clients, counted as they stream.", _MODEL),
    _c("request_success_total", "Finished requests, by finish reason; \"error\": ended by a failure after the "
       "router took it (see request_failures_total).", _MODEL + ("finished_reason",)),
    _c("request_failures_total", "Requests that ended in an error instead of a completion, by reason (one of "
       "REQUEST_FAILURE_REASONS): those refused at admission as well as those that failed while running. "
       "Bodies the HTTP or gRPC server cannot parse never reach the router and are not counted.",
       _MODEL + ("reason",)),
    _c("requests_finished_total", "Finished requests, whatever the finish reason.", _MODEL),
    _c("requests_slo_met_total", "Requests finished by stop/length within the TTFT and TPOT targets.",
       _MODEL),
    _c("requests_slo_violations_total", "Finished requests over a latency target, by target.",
       _MODEL + ("slo",)),
    _g("slo_target_seconds", "Configured latency target, by target; absent when not set.",
       _MODEL + ("slo",)),
    _c("request_migrations_total", "Times a request moved to another decode worker because its decode worker died "
       "mid-stream (token replay; see services/router/migration.py).", _MODEL),
    _c("request_reprefills_total", "Times a request's prompt was prefilled again on another prefill worker because "
       "its prefill worker died before the first token (see services/router/reprefill.py).", _MODEL),
    # Admission (services/router/admission.py): the router's account of the decode pool's KV.
    _g("router_queued_requests", "Requests waiting in the router for admission (room in the decode pool's KV); "
       "past --max-queued-requests new ones are refused with HTTP 429 / RESOURCE_EXHAUSTED.", _MODEL),
    _g("router_admitted_requests", "Requests the router admitted that have not ended yet.", _MODEL),
    _g("router_admitted_kv_tokens", "Worst-case KV tokens (prompt + n x max_tokens) of the admitted requests.",
       _MODEL),
    _g("router_kv_capacity_tokens", "KV tokens the router admits against: the routable decode workers' KV x "
       "--kv-overcommit; 0 when there is no KV limit.", _MODEL),
    _c("request_deadline_exceeded_total", "Requests whose deadline passed, by the stage they were in (waiting "
       "for admission, or running); they end with finished_reason \"abort\" and the client gets DEADLINE_EXCEEDED "
       "or HTTP 504.", _MODEL + ("stage",)),
    _c("disagg_decisions_total", "Where the router prefilled: on a prefill worker, or on the decode worker (for "
       "a short uncached prompt, or for a backlog in the prefill pool).",
       _MODEL + ("decision",)),
    # KV transfer.
    _h("kv_transfer_seconds", "Duration of one successful KV hand-off of one request, by what it crossed.",
       _MODEL + ("transport",), TRANSFER_SECONDS_BUCKETS),
    _h("kv_transfer_bytes", "Bytes moved by one successful KV hand-off of one request, by what it crossed.",
       _MODEL + ("transport",), TRANSFER_BYTES_BUCKETS),
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
WORKER_GAUGES: tuple[str, ...] = tuple(
    s.name for s in SPECS if s.labels == _WORKER and s.kind == "gauge" and s.name != PREFIX + "worker_up"
)
"""The worker gauges a failed poll makes stale (all but worker_up)."""


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raises ValueError unless `value` is one of the label values `allowed`."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
