"""One request whose prompt KV comes from a prefill worker, from its reservation until it joins the batch or ends.

Such a request holds four things on the decode side, and `RemoteRequest` owns all of them:
its blocks in the engine (WAITING_FOR_REMOTE_KV), its expectation in the KV receiver, its lease
timer, and, once generate() claims it, its output sink. Every way out goes through `close(reason)`,
which gives back whatever is still held:

    reserved ──claim()──► claimed ──KV in place──► close("joined"): it decodes in the batch
       │                     │
       │ lease runs out      │ hand-off failed
       ▼                     ▼
    close("expired")      close("recompute"): prefilled here instead (its sink stays open)
    close("aborted")      close("failed"): the request ends with TransferError

"expired", "aborted" and "failed" end the request: its blocks go back and its sink closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from services.engine.async_engine import AsyncEngine, Sink
from services.engine.request import RequestStatus
from services.engine.sampling_params import SamplingParams
from services.transfer.errors import TransferError
from services.transfer.expected import KVArrival
from services.transfer.receiver import KVReceiver

CLOSE_REASONS = ("joined", "recompute", "expired", "aborted", "failed")
_ENDING = ("expired", "aborted", "failed")


class RemoteRequest:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        engine: AsyncEngine,
        receiver: KVReceiver,
        registry: dict[str, RemoteRequest],
        num_cached_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.num_cached_tokens = num_cached_tokens  # leading prompt tokens the local prefix cache already held
        self.closed_as: str | None = None
        self.claimed = False  # generate() took it over (claim)
        self._engine = engine
        self._receiver = receiver
        self._registry = registry
        self._lease: asyncio.TimerHandle | None = None
        self._expiry: asyncio.Future[None] | None = None
        registry[request_id] = self

    @classmethod
    async def reserve(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        engine: AsyncEngine,
        receiver: KVReceiver,
        registry: dict[str, RemoteRequest],
    ) -> RemoteRequest | None:
        """Holds blocks for the prompt and tells the receiver where its KV goes; None when there is no room."""
        blocks = await engine.call(lambda e: e.reserve_remote(request_id, prompt_token_ids, params))
        if blocks is None:
            return None
        remote = cls(request_id, prompt_token_ids, params, engine, receiver, registry, blocks.num_cached_tokens)
        try:
            receiver.expect(request_id, blocks.block_ids, blocks.num_cached_tokens, len(prompt_token_ids))
        except BaseException:
            await remote.close("failed")
            raise
        return remote

    @property
    def closed(self) -> bool:
        return self.closed_as is not None

    def start_lease(self, lease_s: float, on_expired: Callable[[], None]) -> None:
        """Closes the request as "expired" unless generate() claims it within `lease_s`."""

        async def expire() -> None:
            if self._lease is not None and not self.closed:
                on_expired()
                await self.close("expired")

        def start_expiry() -> None:
            self._expiry = asyncio.ensure_future(expire())  # held here, so that it runs to its end

        self._lease = asyncio.get_running_loop().call_later(lease_s, start_expiry)

    def claim(self, sink: Sink) -> None:
        """generate() takes the request over: the lease stops, and its outputs go to `sink` from now on."""
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None
        self._engine.open_sink(self.request_id, sink)
        self.claimed = True

    async def wait_kv(self, first_token: int | None, timeout_s: float) -> KVArrival:
        """Returns once every layer of the prompt's KV is in place (when, and what it came over); else TransferError."""
        if first_token is None:
            raise TransferError("peer_gone", "the prefill worker did not deliver")
        return await self._receiver.wait(self.request_id, timeout_s)

    async def join(self, first_token: int) -> None:
        """The KV is in place: the request joins the running batch with its first token."""
        rid = self.request_id
        outs = await self._engine.call(lambda e: e.finish_remote(rid, first_token))
        if outs[-1].finished:  # the first token already ended it; the router has that token
            self._engine.dispatch([dataclasses.replace(outs[-1], new_token_ids=[])])
        await self.close("joined")

    async def close(self, reason: str) -> None:
        """Gives back what the request still holds (see the module docstring); later calls do nothing."""
        if reason not in CLOSE_REASONS:
            raise ValueError(f"close reason must be one of {CLOSE_REASONS}, got {reason!r}")
        if self.closed:
            return
        self.closed_as = reason
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None
        if self._registry.get(self.request_id) is self:
            del self._registry[self.request_id]
        self._receiver.cancel(self.request_id)
        if reason == "joined":
            return
        rid = self.request_id
        await self._engine.call(lambda e: e.abort([rid], RequestStatus.FINISHED_ABORTED))
        if reason in _ENDING and self.claimed:
            self._engine.close_stream(rid)
