"""Which workers the pools hold: a fixed count, or one per unit of a worker group's resource on each live node;
workers on a draining node stay, but take no new requests."""

from __future__ import annotations

from services.router.metrics import Metrics
from services.router.pool import Node, PoolSpec, WorkerHandle, WorkerPools, WorkerSlot, plan_workers

HEAD = Node("aa" * 14, True, {"CPU": 2.0})  # advertises neither group: never gets a worker
PREFILL = Node("bb" * 14, True, {"CPU": 8.0, "prefill": 2.0})
DECODE = Node("cc" * 14, True, {"CPU": 4.0, "GPU": 1.0, "decode": 1.0})


def test_fixed_counts_ignore_the_nodes() -> None:
    spec = PoolSpec(1, 2, False, cpus_per_worker=1.5)
    assert plan_workers(spec, [PREFILL]) == [
        WorkerSlot("prefill-0", "prefill", 1.5, 0.0),
        WorkerSlot("decode-0", "decode", 1.5, 0.0),
        WorkerSlot("decode-1", "decode", 1.5, 0.0),
    ]


def test_colocated_uses_the_decode_count_only() -> None:
    assert [s.name for s in plan_workers(PoolSpec(3, 2, True), [])] == ["colocated-0", "colocated-1"]


def test_worker_groups_follow_the_nodes_and_share_out_their_cores() -> None:
    plan = plan_workers(PoolSpec(1, 1, False, worker_groups=True), [DECODE, HEAD, PREFILL])
    assert plan == [
        WorkerSlot(f"prefill-{'bb' * 6}-0", "prefill", 4.0, 0.0, PREFILL.node_id, "prefill"),
        WorkerSlot(f"prefill-{'bb' * 6}-1", "prefill", 4.0, 0.0, PREFILL.node_id, "prefill"),
        WorkerSlot(f"decode-{'cc' * 6}-0", "decode", 4.0, 1.0, DECODE.node_id, "decode"),
    ]


def test_a_dead_node_takes_its_workers_with_it() -> None:
    dead = Node(DECODE.node_id, False, DECODE.resources)
    plan = plan_workers(PoolSpec(1, 1, False, worker_groups=True), [PREFILL, dead])
    assert {s.role for s in plan} == {"prefill"}


def test_a_group_that_scales_adds_workers_and_keeps_the_names_of_the_others() -> None:
    spec = PoolSpec(1, 1, False, worker_groups=True)
    before = plan_workers(spec, [PREFILL, DECODE])
    second = Node("dd" * 14, True, {"CPU": 4.0, "decode": 1.0})
    after = plan_workers(spec, [PREFILL, DECODE, second])
    assert set(before) < set(after) and len(after) == len(before) + 1


def test_a_draining_node_keeps_its_workers_marked_draining() -> None:
    spec = PoolSpec(1, 1, False, worker_groups=True)
    draining = Node(DECODE.node_id, True, DECODE.resources, draining=True)
    before = plan_workers(spec, [PREFILL, DECODE])
    during = plan_workers(spec, [PREFILL, draining])
    assert [s.name for s in during] == [s.name for s in before]
    assert [s.name for s in during if s.draining] == [f"decode-{'cc' * 6}-0"]


def _pools_holding(plan: list[WorkerSlot]) -> WorkerPools:
    """Pools that already hold a handle for every slot of `plan`, so following it starts no actor."""
    pools = WorkerPools(None, None, PoolSpec(1, 1, False, worker_groups=True), Metrics())  # type: ignore[arg-type]
    handles = [WorkerHandle(slot.name, slot.role, actor=None, alive=True) for slot in plan]
    pools.prefill = [w for w in handles if w.role == "prefill"]
    pools.decode = [w for w in handles if w.role != "prefill"]
    return pools


def test_workers_on_a_draining_node_take_no_new_requests_until_their_node_goes() -> None:
    spec = PoolSpec(1, 1, False, worker_groups=True)
    pools = _pools_holding(plan_workers(spec, [PREFILL, DECODE]))
    (decode,) = pools.decode
    assert decode.routable
    pools._follow(plan_workers(spec, [PREFILL, Node(DECODE.node_id, True, DECODE.resources, draining=True)]))
    assert pools.decode == [decode] and decode.alive and decode.draining and not decode.routable
    assert all(w.routable for w in pools.prefill)
    pools._follow(plan_workers(spec, [PREFILL, Node(DECODE.node_id, False, DECODE.resources, draining=True)]))
    assert pools.decode == [] and len(pools.prefill) == 2
