"""Worker pools: starts the Ray actors, polls their load, notices workers that leave or come back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray

from services.decode.worker import DecodeWorker
from services.engine.config import EngineConfig
from services.prefill.worker import PrefillWorker
from services.router.metrics import Metrics
from services.transfer.config import TransferConfig
from services.worker.messages import LoadInfo, WorkerInfo

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

    @property
    def free_blocks(self) -> int:
        return self.last_load.stats.num_free_blocks if self.last_load else 0

    @property
    def queued_prefill_tokens(self) -> int:
        return self.last_load.stats.queued_prefill_tokens if self.last_load else 0

    @property
    def kv_address(self) -> str | None:
        return self.info.kv_address if self.info else None


@dataclass(frozen=True)
class PoolSpec:
    num_prefill: int
    num_decode: int
    colocated: bool
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per role (e.g. KubeRay groups)


def _options(name: str, spec: PoolSpec, role: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": name,
        "num_cpus": spec.cpus_per_worker,
        "num_gpus": spec.gpus_per_worker,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": 1000,
    }
    if role in spec.resources:
        options["resources"] = {role: spec.resources[role]}
    return options


def _threads(spec: PoolSpec) -> int:
    return max(1, int(spec.cpus_per_worker)) if spec.gpus_per_worker == 0 else 1


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

    @property
    def all(self) -> list[WorkerHandle]:
        return self.prefill + self.decode

    def start(self) -> None:
        config = dataclasses.replace(self.engine_config, num_threads=_threads(self.spec))
        suffix = os.urandom(3).hex()

        def spawn(cls: type, role: str, resource: str, index: int, *extra: str) -> WorkerHandle:
            name = f"{role}-{index}"
            options = _options(f"pdserve-{name}-{suffix}", self.spec, resource)
            actor: Any = ray.remote(cls).options(**options).remote(config, self.transfer_config, name, *extra)
            return WorkerHandle(name, role, actor)

        if self.spec.colocated:
            n = self.spec.num_decode
            self.decode = [spawn(DecodeWorker, "colocated", "decode", i, "colocated") for i in range(n)]
            return
        self.prefill = [spawn(PrefillWorker, "prefill", "prefill", i) for i in range(self.spec.num_prefill)]
        self.decode = [spawn(DecodeWorker, "decode", "decode", i, "decode") for i in range(self.spec.num_decode)]

    async def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Returns once every worker answered ready(); raises TimeoutError otherwise."""
        async def one(w: WorkerHandle) -> None:
            w.info = await w.actor.ready.remote()
            w.last_load = await w.actor.load.remote(False, True)
            w.alive = True

        await asyncio.wait_for(asyncio.gather(*(one(w) for w in self.all)), timeout_s)
        self._poller = asyncio.create_task(self._poll_forever())

    @property
    def all_alive(self) -> bool:
        return bool(self.all) and all(w.alive for w in self.all)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(w) for w in self.all))
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, w: WorkerHandle) -> None:
        try:
            load = await asyncio.wait_for(w.actor.load.remote(False, True), 10)
            restarted = w.last_load is not None and load.pid != w.last_load.pid
            if restarted or not w.alive:  # a restarted actor has a new KV address
                w.info = await asyncio.wait_for(w.actor.ready.remote(), 30)
                log.info("worker %s is back (pid %d)", w.name, load.pid)
            w.last_load = load
            w.alive = True
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
        for w in self.all:
            ray.kill(w.actor, no_restart=True)
