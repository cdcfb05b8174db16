"""Worker pools: find or start the named worker actors, poll their load, follow workers that come and go.

Workers are named Ray actors, so every router replica finds the same ones, and a router that
restarts finds them again. Which workers there should be is `plan_workers`:
  a fixed count (--prefill-workers N): pdserve-prefill-0 .. N-1, placed by Ray;
  worker groups (--worker-group-resources): one worker per unit of the group's resource
  ("prefill" or "decode") on each live node that advertises it, pinned to that node and named
  after it. Every poll re-reads the cluster's nodes, so a group that scales, or a node that
  dies, shows within a poll interval.
A node the GCS was asked to drain (`pdserve drain-node` in a pod's pre-stop hook, `ray drain-node`,
autoscaler v2) keeps its workers in the pools, marked draining: they finish the requests they have
and the router sends them no new ones (`WorkerHandle.routable`). They leave once the node is gone.
A worker whose calls fail --circuit-breaker-failures times in a row is skipped for new requests too, until
its health poll answers again (the circuit breaker on WorkerHandle).
The first router to ask for a worker creates it (get_if_exists). On a cluster the router joined,
workers are detached: they outlive any one router, and a router that stops leaves them be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from services.decode.worker import DecodeWorker
from services.engine.config import EngineConfig
from services.prefill.worker import PrefillWorker
from services.router.metrics import Metrics
from services.transfer.config import TransferConfig
from services.worker.cores import Cores, share_cores
from services.worker.messages import LoadInfo, WorkerInfo
from services.worker.token_stream import TokenStream, TokenStreamLost

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    name: str
    role: str
    actor: Any
    info: WorkerInfo | None = None
    alive: bool = False
    last_load: LoadInfo | None = None
    inflight: int = 0  # requests the router has sent and not yet seen finish
    prefill_backlog: int = 0  # uncached prompt tokens the router has sent it to prefill, not yet prefilled
    draining: bool = False  # its node is draining: it finishes what it has and gets nothing new
    failures_in_a_row: int = 0  # calls that failed since the last one that succeeded
    tripped_at: float | None = None  # when its circuit breaker opened (time.monotonic()); None: closed

    @property
    def routable(self) -> bool:
        """Whether the router may send it a new request."""
        return self.alive and not self.draining and self.tripped_at is None

    # ---- the circuit breaker ---------------------------------------------------------------------
    # closed ──`threshold` failed calls in a row──► open (not routable) ──its health poll answers──► closed.
    # Requests it already has carry on; only new ones go elsewhere. A dead worker's poll answers once Ray has
    # restarted it; a live one that fails requests gets one more try a poll interval later.
    def record_failure(self, threshold: int) -> None:
        """A call to the worker failed (it died, or failed the request); `threshold` 0 never opens the breaker."""
        self.failures_in_a_row += 1
        if threshold and self.failures_in_a_row >= threshold and self.tripped_at is None:
            self.tripped_at = time.monotonic()
            log.warning("worker %s failed %d calls in a row: it gets no new requests until its health poll "
                        "answers", self.name, self.failures_in_a_row)

    def record_success(self) -> None:
        """A call to the worker succeeded: the count of failures in a row starts again."""
        self.failures_in_a_row = 0

    def health_answered(self) -> None:
        """Its health poll answered: the breaker closes."""
        if self.tripped_at is not None:
            log.info("worker %s answers its health poll again: it takes new requests", self.name)
            self.tripped_at = None
            self.failures_in_a_row = 0

    @property
    def free_blocks(self) -> int:
        return self.last_load.stats.num_free_blocks if self.last_load else 0

    @property
    def queued_prefill_tokens(self) -> int:
        return self.last_load.stats.queued_prefill_tokens if self.last_load else 0

    @property
    def kv_address(self) -> str | None:
        return self.info.kv_address if self.info else None

    async def open_tokens(self, arguments: tuple[Any, ...]) -> TokenStream:
        """Starts generate(*arguments) on this decode worker over its token stream (services/worker/token_stream.py).
        A worker not reached where it said it listens is asked again once: Ray may have restarted it since the
        last health poll (a dead one raises Ray's actor error here, as a call would)."""
        async def open_at_latest(refresh: bool) -> TokenStream:
            if refresh or self.info is None or self.info.token_address is None:
                self.info = await self.actor.ready.remote()
            assert self.info.token_address is not None and self.info.token_secret is not None
            return await TokenStream.open(self.info.token_address, self.info.token_secret, arguments)

        try:
            return await open_at_latest(refresh=False)
        except TokenStreamLost:
            return await open_at_latest(refresh=True)


@dataclass(frozen=True)
class PoolSpec:
    num_prefill: int  # with worker groups: how many to wait for at start-up
    num_decode: int
    colocated: bool
    cpus_per_worker: float = 1.0  # with worker groups, a node's CPUs and GPUs are shared out instead
    gpus_per_worker: float = 0.0
    worker_groups: bool = False  # follow the nodes that advertise a "prefill" / "decode" resource
    shared: bool = False  # on a cluster other routers use: detached workers that a stopping router leaves
    cpu_cores: Cores | None = None  # shared out among the workers, each bound to its own (services/worker/cores.py)


@dataclass(frozen=True)
class Node:
    """What the pools need to know of a Ray node."""

    node_id: str
    alive: bool
    resources: dict[str, float]
    draining: bool = False  # the GCS was asked to drain it; ray.nodes() still shows it alive as before


@dataclass(frozen=True)
class WorkerSlot:
    """One worker the pools should have."""

    name: str  # the worker's name (in metrics); its actor is named "pdserve-<name>"
    role: str  # prefill | decode | colocated
    num_cpus: float
    num_gpus: float
    node_id: str | None = None  # pinned to this node (worker groups)
    resource: str | None = None  # the group's resource, one unit per worker (worker groups)
    draining: bool = False  # on a draining node: keep it for the requests it has, send it no new ones
    cores: Cores | None = None  # bound to these cores (PoolSpec.cpu_cores)


def plan_workers(spec: PoolSpec, nodes: list[Node]) -> list[WorkerSlot]:
    """The workers that should exist, prefill first; `nodes` matters only with worker groups."""
    roles = [("colocated", "decode", spec.num_decode)] if spec.colocated else [
        ("prefill", "prefill", spec.num_prefill), ("decode", "decode", spec.num_decode)]
    slots = []
    for role, resource, count in roles:
        if not spec.worker_groups:
            slots += [WorkerSlot(f"{role}-{i}", role, spec.cpus_per_worker, spec.gpus_per_worker)
                      for i in range(count)]
            continue
        for node in sorted(nodes, key=lambda n: n.node_id):
            units = int(node.resources.get(resource, 0)) if node.alive else 0
            for i in range(units):
                cpus = node.resources.get("CPU", 0.0) / units
                gpus = node.resources.get("GPU", 0.0) / units
                slots.append(WorkerSlot(f"{role}-{node.node_id[:12]}-{i}", role, cpus, gpus,
                                        node.node_id, resource, node.draining))
    shares = share_cores(spec.cpu_cores, [s.role for s in slots]) if spec.cpu_cores else None
    if shares is None or spec.worker_groups:
        return slots
    return [dataclasses.replace(slot, cores=cores) for slot, cores in zip(slots, shares, strict=True)]


def cluster_nodes() -> list[Node]:
    draining = draining_node_ids()
    return [Node(n["NodeID"], bool(n["Alive"]), dict(n.get("Resources", {})), n["NodeID"] in draining)
            for n in ray.nodes()]


def draining_node_ids() -> set[str]:
    """The nodes the GCS was asked to drain, by hex id. ray.nodes() does not tell them apart (alive, same
    resources); the GCS's table of draining nodes, which Ray Serve reads too, does."""
    return set(ray._private.state.state.get_draining_nodes())


class WorkerPools:
    def __init__(self, engine: EngineConfig, transfer: TransferConfig, spec: PoolSpec, metrics: Metrics) -> None:
        self.engine_config = engine
        self.transfer_config = transfer
        self.spec = spec
        self.metrics = metrics
        self.prefill: list[WorkerHandle] = []
        self.decode: list[WorkerHandle] = []
        self._poller: asyncio.Task[None] | None = None
        self.poll_interval_s = 1.0
        self._suffix = os.urandom(3).hex()

    @property
    def all(self) -> list[WorkerHandle]:
        return self.prefill + self.decode

    def start(self) -> None:
        """Finds or starts the workers the plan names (see the module docstring)."""
        self._follow(plan_workers(self.spec, cluster_nodes() if self.spec.worker_groups else []))

    def _follow(self, plan: list[WorkerSlot]) -> None:
        """Makes the pools hold exactly the planned workers: new ones are found or started, gone ones dropped."""
        known = {w.name: w for w in self.all}
        handles = [known.get(slot.name) or self._worker(slot) for slot in plan]
        for slot, handle in zip(plan, handles, strict=True):
            if slot.draining and not handle.draining:
                log.info("worker %s is draining: it finishes its requests and gets no new ones", slot.name)
            handle.draining = slot.draining
        for name in known.keys() - {slot.name for slot in plan}:
            log.info("worker %s has left its pool", name)
            self.metrics.mark_worker_down(name, known[name].role)
        self.prefill = [w for w in handles if w.role == "prefill"]
        self.decode = [w for w in handles if w.role != "prefill"]

    def _worker(self, slot: WorkerSlot) -> WorkerHandle:
        # Workers of a router's own Ray are its alone: their names are its own too.
        suffix = "" if self.spec.shared else f"-{self._suffix}"
        options: dict[str, Any] = {
            "name": f"pdserve-{slot.name}{suffix}",
            "get_if_exists": True,
            "num_cpus": slot.num_cpus,
            "num_gpus": slot.num_gpus,
            "max_restarts": -1,
            "max_task_retries": 0,
            "max_concurrency": 1000,
        }
        if self.spec.shared:
            options["lifetime"] = "detached"
        if slot.node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.node_id, soft=False)
        if slot.resource is not None:
            options["resources"] = {slot.resource: 1.0}
        threads = len(slot.cores) if slot.cores else max(1, int(slot.num_cpus)) if slot.num_gpus == 0 else 1
        # A decode worker shares its cores: with the router and Ray's daemons on the router's host
        # (cores.router_cores), with Ray's daemons elsewhere. A single row's products split over two threads wait
        # at their barrier whenever one of those takes a core, so such a step runs on one.
        single_row = None if slot.role == "prefill" else 1  # (CUDA workers leave it unused)
        config = dataclasses.replace(self.engine_config, num_threads=threads, single_row_threads=single_row)
        actor: Any
        if slot.role == "prefill":
            actor = ray.remote(PrefillWorker).options(**options).remote(
                config, self.transfer_config, slot.name, cores=slot.cores)
        else:
            actor = ray.remote(DecodeWorker).options(**options).remote(
                config, self.transfer_config, slot.name, slot.role, cores=slot.cores)
        return WorkerHandle(slot.name, slot.role, actor)

    async def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Returns once the pools hold the workers the spec asks for, every one ready; else TimeoutError."""

        async def ready() -> None:
            while True:
                await asyncio.gather(*(self._poll(w) for w in self.all if not w.alive))
                alive_prefill = sum(w.alive for w in self.prefill)
                alive_decode = sum(w.alive for w in self.decode)
                wanted_prefill = 0 if self.spec.colocated else self.spec.num_prefill
                if alive_prefill >= wanted_prefill and alive_decode >= self.spec.num_decode and self.all_alive:
                    return
                await asyncio.sleep(0.2)
                if self.spec.worker_groups:
                    self.start()

        await asyncio.wait_for(ready(), timeout_s)
        self._poller = asyncio.create_task(self._poll_forever())

    @property
    def all_alive(self) -> bool:
        return bool(self.all) and all(w.alive for w in self.all)

    async def _poll_forever(self) -> None:
        while True:
            if self.spec.worker_groups:
                try:
                    self.start()
                except Exception as e:  # noqa: BLE001 - the GCS may be briefly away; try again next time
                    log.warning("cannot read the cluster's nodes: %s", e)
            await asyncio.gather(*(self._poll(w) for w in self.all))
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, w: WorkerHandle) -> None:
        try:
            load = await asyncio.wait_for(w.actor.load.remote(False, True), 10)
            restarted = w.last_load is not None and load.pid != w.last_load.pid
            if restarted or not w.alive:  # a restarted actor has a new KV address
                w.info = await asyncio.wait_for(w.actor.ready.remote(), 30)
                if w.last_load is not None:
                    log.info("worker %s is back (pid %d)", w.name, load.pid)
            w.last_load = load
            w.alive = True
            w.health_answered()
            self.metrics.update_worker(w.last_load.stats)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - any failure means the worker is unreachable now
            if w.alive:
                log.warning("worker %s is unreachable: %s", w.name, e)
            w.alive = False
            self.metrics.mark_worker_down(w.name, w.role)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if not self.spec.shared:
            for w in self.all:
                ray.kill(w.actor, no_restart=True)
