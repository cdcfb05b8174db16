"""The series of each polled worker: set from WorkerStats, marked down, or removed.

A `WorkerStats` carries gauges (set as they are) and `*_delta` counts of events since the previous
poll (added to the counters), so no event is counted twice and none is lost while the worker lives.
Every series here carries the labels `model_name`, `role` and `worker`.
"""

from __future__ import annotations

import threading

from services.engine.stats import WorkerStats
from services.router.metric_families import Families
from services.router.metric_specs import ROLES, WORKER_GAUGES, WORKER_METRIC_NAMES, check_choice

_COUNTS = (
    "num_running", "num_waiting", "num_waiting_for_remote_kv", "num_free_blocks", "num_total_blocks",
    "queued_prefill_tokens", "prefix_cache_queries_delta", "prefix_cache_hits_delta",
    "num_preemptions_delta", "kv_reservations_expired_delta",
)


def _check_worker(worker: str, role: str) -> None:
    check_choice("role", role, ROLES)
    if not worker:
        raise ValueError("the worker name must be non-empty")


def _check_stats(stats: WorkerStats) -> None:
    _check_worker(stats.worker, stats.role)
    counts = {name: getattr(stats, name) for name in _COUNTS}
    bad = {name: v for name, v in counts.items() if not v >= 0}
    if bad:
        raise ValueError(f"worker {stats.worker!r}: counts must be non-negative, got {bad}")
    if stats.num_free_blocks > stats.num_total_blocks:
        raise ValueError(f"worker {stats.worker!r}: {stats.num_free_blocks} free blocks > "
                         f"{stats.num_total_blocks} total")


class WorkerSeries:
    """Thread-safe; every method validates before it records. A worker that reappears in another
    role loses the series of its old role first."""

    def __init__(self, families: Families, model_name: str) -> None:
        self._families = families
        self._model_name = model_name
        self._lock = threading.Lock()
        self._roles: dict[str, str] = {}  # worker -> role, of workers with series

    def update(self, stats: WorkerStats) -> None:
        """Record one poll: set the worker's gauges, add its `*_delta` counts, mark it up."""
        _check_stats(stats)
        key = (self._model_name, stats.role, stats.worker)
        gauge, counter = self._families.gauge, self._families.counter
        with self._lock:
            self._claim_locked(stats.worker, stats.role)
            gauge("worker_up").labels(*key).set(1)
            gauge("num_requests_running").labels(*key).set(stats.num_running)
            gauge("num_requests_waiting").labels(*key).set(stats.num_waiting)
            gauge("num_requests_waiting_for_remote_kv").labels(*key).set(stats.num_waiting_for_remote_kv)
            gauge("queued_prefill_tokens").labels(*key).set(stats.queued_prefill_tokens)
            gauge("kv_cache_usage_perc").labels(*key).set(stats.kv_cache_usage)
            counter("prefix_cache_queries_total").labels(*key).inc(stats.prefix_cache_queries_delta)
            counter("prefix_cache_hits_total").labels(*key).inc(stats.prefix_cache_hits_delta)
            counter("num_preemptions_total").labels(*key).inc(stats.num_preemptions_delta)
            counter("kv_reservations_expired_total").labels(*key).inc(stats.kv_reservations_expired_delta)

    def mark_down(self, worker: str, role: str) -> None:
        """A poll failed: worker_up becomes 0 and the stale gauges go; counters stay."""
        _check_worker(worker, role)
        key = (self._model_name, role, worker)
        with self._lock:
            self._claim_locked(worker, role)
            self._families.gauge("worker_up").labels(*key).set(0)
            for name in WORKER_GAUGES:
                self._families.drop(name, key)

    def remove(self, worker: str, role: str) -> None:
        """The worker left the pool on purpose: drop every series that names it."""
        _check_worker(worker, role)
        with self._lock:
            self._remove_locked(worker, role)

    def _claim_locked(self, worker: str, role: str) -> None:
        old_role = self._roles.get(worker)
        if old_role is not None and old_role != role:
            self._remove_locked(worker, old_role)
        self._roles[worker] = role

    def _remove_locked(self, worker: str, role: str) -> None:
        key = (self._model_name, role, worker)
        for name in WORKER_METRIC_NAMES:
            self._families.drop(name, key)
        if self._roles.get(worker) == role:
            del self._roles[worker]
