"""The decode worker (a Ray actor): reserves blocks, receives prompt KV over UCX, decodes.

A request reaches it in one of two ways:
  remote: reserve() → (a prefill worker sends the KV) → generate(first_token=...) claims the
          reservation, waits for the KV, and joins the running batch;
  local:  generate(first_token=None, local=True) prefills here (colocated mode, short
          uncached prompts, and the recompute fallback after a failed hand-off).
A reservation not claimed within its lease is released, so a dead request never strands blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.errors import InvalidRequest, ResourceExhausted
from services.engine.logprobs import TokenLogprob
from services.engine.request import RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RequestOutput
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.receiver import KVReceiver
from services.worker.base import EngineWorker
from services.worker.fingerprint import kv_fingerprint
from services.worker.messages import Reservation, TokenBatch, WorkerInfo


@dataclass
class _Lease:
    """A reservation's timer and the request it holds blocks for (so generate() need not be sent it again)."""

    timer: asyncio.TimerHandle
    prompt_token_ids: list[int]
    params: SamplingParams


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, config: EngineConfig, transfer: TransferConfig, name: str, role: str = "decode") -> None:
        super().__init__(config, name)
        self.role = role
        self.transfer_config = transfer
        self.receiver = KVReceiver(self.engine.runner.kv_cache, kv_fingerprint(self), transfer)
        self.address: str | None = None
        self.leases: dict[str, _Lease] = {}
        self.expired_leases = 0

    async def ready(self) -> WorkerInfo:
        # UCX reads the environment while it comes up; bring it up before the engine thread starts,
        # so that no thread of ours can be changing the environment meanwhile (a getenv racing a
        # setenv crashed a worker at start-up once).
        if self.address is None and self.role == "decode":
            self.address = await self.receiver.start()
        self._ensure_started()
        bm = self.engine.block_manager
        return WorkerInfo(self.name, self.role, self.address, bm.block_size, bm.num_blocks)

    def num_reservations(self) -> int:
        return len(self.leases)

    def take_expired(self) -> int:
        expired, self.expired_leases = self.expired_leases, 0
        return expired

    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lease_s: float
    ) -> Reservation:
        """Holds blocks for the prompt; raises ResourceExhausted when there is no room."""
        self._ensure_started()

        def reserve(engine: LLMEngine) -> tuple[int, list[int]]:
            if request_id in engine.scheduler.requests:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            request = engine.make_request(request_id, prompt_token_ids, params)
            cached = engine.scheduler.reserve_remote(request)
            return cached, list(engine.block_manager.block_ids(request_id))

        cached, block_ids = await self.async_engine.call(reserve)
        if cached < 0:
            raise ResourceExhausted(
                f"decode worker {self.name} has no free KV blocks for {len(prompt_token_ids)} tokens"
            )
        self.receiver.expect(request_id, block_ids, cached, len(prompt_token_ids))
        loop = asyncio.get_running_loop()
        timer = loop.call_later(lease_s, lambda: asyncio.ensure_future(self._expire(request_id)))
        self.leases[request_id] = _Lease(timer, prompt_token_ids, params)
        return Reservation(request_id, cached, lease_s)

    async def _expire(self, request_id: str) -> None:
        if self.leases.pop(request_id, None) is None:
            return
        self.expired_leases += 1
        await self._release(request_id)

    async def _release(self, request_id: str) -> None:
        self.receiver.cancel(request_id)
        await self.async_engine.call(lambda e: e.abort([request_id], RequestStatus.FINISHED_ABORTED))

    async def abort(self, request_id: str) -> bool:
        lease = self.leases.pop(request_id, None)
        if lease is not None:
            lease.timer.cancel()
            self.receiver.cancel(request_id)
        return await super().abort(request_id) or lease is not None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int] | None,
        params: SamplingParams | None,
        first_token: int | None = None,
        local: bool = False,
        priority: int = 0,
    ) -> AsyncIterator[TokenBatch]:
        """Streams the request's tokens after `first_token` (remote) or from the start (local).

        A local request brings its prompt and params; a remote one was sent them with reserve().
        Remote with first_token None means the prefill side failed: under the "recompute"
        policy the prompt is prefilled here instead; under "fail" TransferError is raised.
        """
        self._ensure_started()
        stream = self.async_engine.open_stream(request_id)
        lease = self.leases.pop(request_id, None)
        if lease is not None:
            lease.timer.cancel()
            prompt_token_ids, params = lease.prompt_token_ids, lease.params
        generated: list[int] = []
        kv_failure: str | None = None
        if not local:
            if lease is None:
                self.async_engine.close_stream(request_id)
                raise TransferError("cancelled", f"no live reservation for {request_id} (lease expired or aborted)")
            kv_failure = await self._await_kv(request_id, first_token)
            local = kv_failure is not None
            # The client already has the first token: a recompute continues after it.
            generated = [first_token] if local and first_token is not None else []
        if local:

            if prompt_token_ids is None or params is None:
                self.async_engine.close_stream(request_id)
                raise InvalidRequest(f"request {request_id}: a local request needs its prompt and params")
            prompt, sampling = prompt_token_ids, params

            def add(engine: LLMEngine) -> None:
                if request_id in engine.scheduler.requests:  # a reservation that falls back to recompute
                    engine.abort([request_id], RequestStatus.FINISHED_ABORTED)
                engine.add_request(request_id, prompt, sampling, priority, generated)

            try:
                await self.async_engine.call(add)
            except BaseException:
                self.async_engine.close_stream(request_id)
                raise
        decode_start: float | None = time.time()
        async for batch in self.async_engine.outputs(request_id, stream):
            yield TokenBatch(
                token_ids=[t for out in batch for t in out.new_token_ids],
                finished=batch[-1].finished,
                finish_reason=batch[-1].finish_reason,
                num_cached_tokens=batch[-1].num_cached_tokens,
                decode_start=decode_start,
                kv_failure=kv_failure,
                logprobs=_logprobs(batch),
                prompt_logprobs=batch[0].prompt_logprobs,
            )
            decode_start = kv_failure = None

    async def _await_kv(self, request_id: str, first_token: int | None) -> str | None:
        """None when the KV arrived and the request joined the batch; else why not (then it is recomputed here)."""
        try:
            if first_token is None:
                raise TransferError("peer_gone", "the prefill worker did not deliver")
            await self.receiver.wait(request_id, self.transfer_config.timeout_s)
        except TransferError as e:
            self.receiver.cancel(request_id)
            if self.transfer_config.failure_policy != "recompute":
                await self.async_engine.call(lambda e: e.abort([request_id], RequestStatus.FINISHED_ABORTED))
                self.async_engine.close_stream(request_id)
                raise
            return e.reason
        token = first_token
        outs = await self.async_engine.call(lambda e: e.scheduler.finish_remote(request_id, token))
        if outs[-1].finished:  # the first token already ended it; the router has that token
            self.async_engine.dispatch([dataclasses.replace(outs[-1], new_token_ids=[])])
        return None


def _logprobs(batch: list[RequestOutput]) -> list[TokenLogprob] | None:
    """The batch's token logprobs in token order; None when the request did not ask for them."""
    if all(out.logprobs is None for out in batch):
        return None
    return [lp for out in batch for lp in out.logprobs or []]
