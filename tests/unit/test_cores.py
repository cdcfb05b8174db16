"""Cores for each process of a one-machine CPU deployment (services/worker/cores.py, PoolSpec.cpu_cores)."""

from __future__ import annotations

import os
import threading

from services.router.pool import PoolSpec, plan_workers
from services.worker.cores import bind_process, router_cores, share_cores


def test_each_worker_gets_cores_of_its_own() -> None:
    assert share_cores([0, 1], ["prefill", "decode"]) == [(0,), (1,)]
    assert share_cores([0, 1, 2, 3, 4], ["prefill", "decode"]) == [(0, 1), (2, 3, 4)]
    assert share_cores([0, 1], ["colocated"]) == [(0, 1)]
    assert share_cores([0, 1], ["prefill", "decode", "decode"]) is None  # more workers than cores: none bound


def test_the_router_runs_on_the_decode_workers_cores() -> None:
    assert router_cores([(0,), (1,)], ["prefill", "decode"]) == (1,)
    assert router_cores([(0,), (1,), (2, 3)], ["prefill", "decode", "decode"]) == (1, 2, 3)
    assert router_cores([(0, 1), (2, 3)], ["colocated", "colocated"]) == (0, 1, 2, 3)


def test_the_plan_binds_workers_only_when_asked_and_without_worker_groups() -> None:
    spec = PoolSpec(1, 1, False, cpu_cores=(0, 1))
    assert [(s.name, s.cores) for s in plan_workers(spec, [])] == [("prefill-0", (0,)), ("decode-0", (1,))]
    assert all(s.cores is None for s in plan_workers(PoolSpec(1, 1, False), []))
    assert all(s.cores is None for s in plan_workers(PoolSpec(2, 1, False, cpu_cores=(0, 1)), []))


def test_binding_reaches_every_thread_of_the_process() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    stop = threading.Event()
    seen: list[set[int]] = []
    thread = threading.Thread(target=lambda: (stop.wait(), seen.append(os.sched_getaffinity(0))))
    thread.start()
    try:
        bind_process((allowed[0],))
        stop.set()
        thread.join()
        assert seen == [{allowed[0]}] and os.sched_getaffinity(0) == {allowed[0]}
    finally:
        bind_process(tuple(allowed))
