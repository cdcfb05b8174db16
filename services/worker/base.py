"""What every worker actor shares: an engine on its own thread, load reports and abort.

The prefill and decode actors subclass EngineWorker; colocated mode runs a decode worker in both phases.
"""

from __future__ import annotations

import os

from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import RequestStatus
from services.engine.scheduler import RequestOutput
from services.transfer.config import ray_node_ip
from services.worker.cores import Cores, bind_process
from services.worker.messages import LoadInfo


class EngineWorker:
    role = "colocated"

    def __init__(self, config: EngineConfig, name: str, cores: Cores | None = None) -> None:
        if cores:  # before the engine starts torch's threads, so that they run there too
            bind_process(cores)
        self.name = name
        self.config = config
        self.engine = LLMEngine(config)
        self.async_engine = AsyncEngine(self.engine)
        self._started = False
        self.node_ip = ray_node_ip()

    def _ensure_started(self) -> None:
        if not self._started:
            self.async_engine.start()
            self._started = True

    async def pid(self) -> int:
        return os.getpid()

    def num_reservations(self) -> int:
        return 0

    def take_expired(self) -> int:
        """Reservations whose lease ran out since the last call (decode workers hold reservations)."""
        return 0

    async def load(self, check_integrity: bool = False, take_deltas: bool = False) -> LoadInfo:
        self._ensure_started()

        def read(engine: LLMEngine) -> LoadInfo:
            return LoadInfo(
                stats=engine.stats(self.name, self.role, take_deltas),
                num_used_blocks=engine.num_used_blocks,
                num_reservations=self.num_reservations(),
                integrity_error=engine.check_integrity() if check_integrity else None,
                pid=os.getpid(),
                node_ip=self.node_ip,
            )

        info = await self.async_engine.call(read)
        if take_deltas:
            info.stats.kv_reservations_expired_delta = self.take_expired()
        return info

    async def abort(self, request_id: str) -> bool:
        self._ensure_started()

        def abort(engine: LLMEngine) -> bool:
            found = engine.has_request(request_id)
            engine.abort([request_id], RequestStatus.FINISHED_ABORTED)
            return found

        found = await self.async_engine.call(abort)
        # Wake whoever streams this request: it ends with "abort".
        self.async_engine.dispatch([RequestOutput(request_id, [], True, "abort", 0, 0, 0)])
        return found
