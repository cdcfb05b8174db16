"""The decode worker (a Ray actor): reserves blocks, receives prompt KV over UCX, decodes.

A request reaches it in one of two ways:
  remote: reserve() → (a prefill worker sends the KV) → generate(first_token=...) claims the
          reservation, waits for the KV, and joins the running batch;
  local:  generate(first_token=None, local=True) prefills here (colocated mode, short
          uncached prompts, and the recompute fallback after a failed hand-off).
A remote request is a RemoteRequest (remote.py) until it joins the batch: it owns the blocks, the
receiver's expectation, the lease and the stream, and one close(reason) gives them back. A
reservation not claimed within its lease is released, so a dead request never strands blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import NamedTuple

from services.decode.remote import RemoteRequest
from services.engine.config import EngineConfig
from services.engine.errors import InvalidRequest, ResourceExhausted
from services.engine.request import RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RequestOutput
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.receiver import KVReceiver
from services.worker.base import EngineWorker
from services.worker.cores import Cores
from services.worker.fingerprint import kv_fingerprint
from services.worker.messages import Reservation, TokenBatch, WorkerInfo
from services.worker.token_stream import SendBatch, TokenServer


class Handoff(NamedTuple):
    """How a remote request's prompt KV came: what it crossed when it arrived, or why it did not (recomputed here)."""

    transport: str | None = None  # KVArrival.transport
    failure: str | None = None  # TransferError.reason


class Batches:
    """A request's outputs as TokenBatches, each handed to `send` on the thread that made the output: the
    engine's, as its step ends (or the loop's, for an abort). The first batch says when decoding started and how
    the prompt's KV came (`handoff`, set before the request can make outputs); `finished` resolves once the
    finished batch is sent."""

    def __init__(self, send: SendBatch, loop: asyncio.AbstractEventLoop) -> None:
        self.handoff = Handoff()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._send, self._loop = send, loop
        self._lock = threading.Lock()
        self._sent_first = self._sent_last = False

    def __call__(self, out: RequestOutput) -> None:
        with self._lock:
            if self._sent_last:
                return
            first = not self._sent_first
            self._sent_first, self._sent_last = True, out.finished
            self._send(TokenBatch(
                token_ids=out.new_token_ids,
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_cached_tokens=out.num_cached_tokens,
                decode_start=time.time() if first else None,
                kv_failure=self.handoff.failure if first else None,
                kv_transport=self.handoff.transport if first else None,
                logprobs=out.logprobs,
                prompt_logprobs=out.prompt_logprobs,
                step_seconds=out.step_seconds,
                produced_at=out.produced_at,
            ))  # fmt: skip
        if out.finished:
            self._loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, config: EngineConfig, transfer: TransferConfig, name: str, role: str = "decode",
                 cores: Cores | None = None) -> None:
        super().__init__(config, name, cores)
        self.role = role
        log_info_of("services.transfer")
        transfer = transfer.on_node()
        self.transfer_config = transfer
        self.receiver = KVReceiver(self.engine.kv_cache, kv_fingerprint(self), transfer)
        self.address: str | None = None
        self.remote: dict[str, RemoteRequest] = {}  # reserved or claimed, not yet in the batch
        self.tokens = TokenServer(self.generate)
        self.expired_leases = 0

    async def ready(self) -> WorkerInfo:
        # UCX reads the environment while it comes up; bring it up before the engine thread starts,
        # so that no thread of ours can be changing the environment meanwhile (a getenv racing a
        # setenv crashed a worker at start-up once).
        if self.address is None and self.role == "decode":
            self.address = await self.receiver.start()
        token_address = await self.tokens.start(self.transfer_config.host or "127.0.0.1")
        self._ensure_started()
        return WorkerInfo(self.name, self.role, self.address, self.engine.block_size, self.engine.num_blocks,
                          token_address, self.tokens.secret)

    def num_reservations(self) -> int:
        return len(self.remote)

    def take_expired(self) -> int:
        expired, self.expired_leases = self.expired_leases, 0
        return expired

    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lease_s: float
    ) -> Reservation:
        """Holds blocks for the prompt; raises ResourceExhausted when there is no room."""
        self._ensure_started()
        remote = await RemoteRequest.reserve(
            request_id, prompt_token_ids, params, self.async_engine, self.receiver, self.remote
        )
        if remote is None:
            raise ResourceExhausted(
                f"decode worker {self.name} has no free KV blocks for {len(prompt_token_ids)} tokens"
            )
        remote.start_lease(lease_s, self._count_expired)
        return Reservation(request_id, remote.num_cached_tokens, lease_s)

    def _count_expired(self) -> None:
        self.expired_leases += 1

    async def abort(self, request_id: str) -> bool:
        remote = self.remote.get(request_id)
        if remote is not None:
            await remote.close("aborted")
        return await super().abort(request_id) or remote is not None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int] | None,
        params: SamplingParams | None,
        first_token: int | None = None,
        local: bool = False,
        priority: int = 0,
        generated: list[int] | None = None,
        *,
        send: SendBatch,
    ) -> None:
        """Hands `send` the request's tokens after `first_token` (remote) or from the start (local), a batch per
        engine step, from the engine's thread as each step ends (services/worker/token_stream.py); returns once
        the finished batch is sent. Cancelled, it aborts the request.

        A local request brings its prompt and params; a remote one was sent them with reserve().
        Remote with first_token None means the prefill side failed: under the "recompute"
        policy the prompt is prefilled here instead; under "fail" TransferError is raised.
        A local request with `generated` resumes one whose decode worker died (the router's migration): those
        tokens, which the client already has, are prefilled with the prompt and count as generated, and the
        stream carries only the tokens after them.
        """
        self._ensure_started()
        remote = self.remote.get(request_id)
        batches = Batches(send, asyncio.get_running_loop())
        if local:
            if remote is not None:  # reserved, and then the router chose to prefill here
                await remote.close("recompute")
            if prompt_token_ids is None or params is None:
                raise InvalidRequest(f"request {request_id}: a local request needs its prompt and params")
            self.async_engine.open_sink(request_id, batches)
            await self._add_local(request_id, prompt_token_ids, params, priority, list(generated or []))
        else:
            if remote is None:
                raise TransferError("cancelled", f"no live reservation for {request_id} (lease expired or aborted)")
            remote.claim(batches)
            await self._remote_prefill(remote, first_token, priority, batches)
            if remote.closed_as == "aborted":
                send(TokenBatch([], True, "abort", 0))
                return
        try:
            await batches.finished
        finally:
            self.async_engine.close_stream(request_id)
            if not batches.finished.done():  # the router went: the request ends here too
                await self.async_engine.call(lambda e: e.abort([request_id], RequestStatus.FINISHED_ABORTED))

    async def _remote_prefill(self, remote: RemoteRequest, first_token: int | None, priority: int,
                              batches: Batches) -> None:
        """Once the KV arrived, the request joins the batch, and its first batch says what the KV came over; else
        the prompt is prefilled here instead, and the first batch says why (under "recompute"; under "fail" the
        TransferError is raised)."""
        try:
            arrival = await remote.wait_kv(first_token, self.transfer_config.timeout_s)
        except TransferError as e:
            if remote.closed:  # aborted while it waited
                return
            if self.transfer_config.failure_policy != "recompute":
                await remote.close("failed")
                raise
            await remote.close("recompute")
            # The client already has the first token: the recompute continues after it.
            generated = [first_token] if first_token is not None else []
            batches.handoff = Handoff(failure=e.reason)
            await self._add_local(remote.request_id, remote.prompt_token_ids, remote.params, priority, generated)
            return
        assert first_token is not None  # wait_kv saw to it
        batches.handoff = Handoff(transport=arrival.transport)
        await remote.join(first_token)

    async def _add_local(
        self, request_id: str, prompt: list[int], params: SamplingParams, priority: int, generated: list[int]
    ) -> None:
        """Queue the request to be prefilled here; its stream is closed if that fails."""
        try:
            await self.async_engine.call(lambda e: e.add_request(request_id, prompt, params, priority, generated))
        except BaseException:
            self.async_engine.close_stream(request_id)
            raise



def log_info_of(name: str) -> None:
    """Let INFO records of logger `name` reach stderr (the worker's log) where nothing configured logging.

    Ray leaves an actor's root logger at WARNING with no handler, which drops INFO lines such as the
    receiver's "KV connection N from PEER: reads over tcp"; a process that configured logging keeps its own.
    """
    logger = logging.getLogger(name)
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
