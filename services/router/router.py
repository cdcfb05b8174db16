"""The router's request path, shared by the gRPC and HTTP front ends.

disagg:    reserve on a decode worker ─► prefill worker computes and streams KV over UCX
           ─► first token to the client ─► decode worker claims the reservation and streams the rest
local:     colocated, or a short prompt or a backlogged prefill pool (placement.py): the decode worker does both
migrated:  the decode worker died mid-stream: another one resumes the output by token replay (migration.py)
re-prefill: the prefill worker died before the first token: another one prefills it again (reprefill.py)
The router detokenizes incrementally and applies stop strings; abort, client cancellation and
deadlines release the request's KV on both sides, the prefill worker's included while it still computes.
A request id is taken from admission until every release of its outputs is done, so a new request with the
same id can never meet the old one's KV on a worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.engine.sampling_params import SamplingParams
from services.engine.stats import TransferStats
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from services.router.admission import Aborted, Admission, Deadline, Ticket, kv_capacity, kv_need
from services.router.config import RouterConfig
from services.router.errors import Unavailable
from services.router.failures import (
    TransferFailed,
    WorkerFailed,
    client_error,
    failure_reason,
    is_worker_death,
    transfer_failure_reason,
    unwrap,
)
from services.router.messages import Completion, Event, GenerateInput, PreparedRequest
from services.router.metrics import Metrics
from services.router.migration import Migrations
from services.router.openai_fields import RequestError
from services.router.output import emit, emit_batch, finish, observe_delivery, record_finished
from services.router.placement import place, prefilled_locally, prefilling
from services.router.policies import Policy, RoutingRequest, make_policy
from services.router.pool import WorkerHandle, WorkerPools
from services.router.reprefill import PrefillDied, Reprefills, reserve_again
from services.router.request_state import RequestState, worker_ids
from services.transfer.errors import TransferError
from services.worker.messages import PrefillResult
from services.worker.validation import validate_prompt

log = logging.getLogger(__name__)

# Each stop string is searched for in the new text of every token; past a few dozen that is work for nothing.
MAX_STOP_STRINGS = 64


class Router:
    def __init__(self, config: RouterConfig, pools: WorkerPools, tokenizer: Tokenizer, metrics: Metrics,
                 vocab_size: int, max_model_len: int, block_size: int,
                 sampling_defaults: dict[str, Any] | None = None) -> None:
        self.config = config
        # The model's generation_config.json values for sampling fields a request leaves out (empty: none).
        self.sampling_defaults = dict(sampling_defaults or {})
        self.pools = pools
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.prefill_policy = make_policy(config.prefill_policy)
        self.decode_policy = make_policy(config.decode_policy)
        self.migrations = Migrations(config, metrics, self.decode_policy, block_size)
        self.reprefills = Reprefills(metrics, self.prefill_policy)
        self.active: dict[str, list[asyncio.Task[None]]] = {}  # by request id: one task per output
        self.owners: dict[str, str | None] = {}  # by request id: GenerateInput.owner
        self.tickets: dict[str, Ticket] = {}  # by request id: its place in the admission account
        self.worker_ids: set[str] = set()  # the ids the active requests' outputs run under on the workers
        self.draining = False
        self.admission = Admission(config, lambda: kv_capacity(self.pools.decode), metrics)

    # ---- input ----------------------------------------------------------------------------
    def prepare(self, inp: GenerateInput) -> PreparedRequest:
        """Validates and tokenizes; raises InvalidRequest with a clear message."""
        if inp.text is None and inp.token_ids is None:
            raise InvalidRequest("the request has no input: give text or token_ids")
        if inp.text is not None and not inp.text:
            raise InvalidRequest("the prompt text is empty")
        ids = self.tokenizer.encode(inp.text) if inp.text is not None else list(inp.token_ids or [])
        defaults = {**self.sampling_defaults, "max_tokens": self.config.default_max_tokens}
        params = inp.params or SamplingParams(**defaults)
        validate_prompt(ids, params, self.vocab_size, self.max_model_len)
        if len(params.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop holds {len(params.stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
                               "stop")
        rid = inp.request_id or uuid.uuid4().hex
        if rid in self.active or not self.worker_ids.isdisjoint(worker_ids(rid, params.n)):
            raise InvalidRequest(f"request id {rid!r} is already in use")
        return PreparedRequest(rid, ids, params)

    # ---- the request path ---------------------------------------------------------------------
    async def generate(self, inp: GenerateInput, timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Streams Chunks and one Completion per output (params.n of them, told apart by `index`).
        Raises InvalidRequest, ResourceExhausted, Unavailable (counted as failures), DeadlineExceeded (admission.py).

        With n > 1, output 0 runs first; the others start once it has its first token, so that
        the prompt's KV is in the workers' prefix caches by then and is shared, not recomputed."""
        try:
            if self.draining:
                raise Unavailable("the server is draining")
            prepared = self.prepare(inp)
        except Exception as e:
            self.metrics.observe_failure(failure_reason(e))
            raise
        rid, ids, params = prepared.request_id, prepared.token_ids, prepared.params
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        n, children = params.n, worker_ids(rid, params.n)

        def start(index: int) -> None:
            sample = params if n == 1 else params.for_sample(index)
            run = self._run(children[index], index, ids, sample, inp.priority, queue, ticket.deadline)
            tasks.append(asyncio.create_task(run))

        tasks: list[asyncio.Task[None]] = []
        self.active[rid], self.owners[rid] = tasks, inp.owner
        self.worker_ids.update(children)
        ticket = self.tickets[rid] = self.admission.ticket(kv_need(len(ids), params, self.max_model_len), timeout_s)
        try:
            try:
                await self.admission.admit(ticket)
            except Aborted:  # before it ran: every output ends, with nothing generated
                for index in range(n):
                    yield Completion("abort", len(ids), 0, 0, index)
                return
            start(0)
            done = 0
            while done < n:
                event = await self.admission.until(ticket, queue.get())
                if isinstance(event, BaseException):
                    self.metrics.observe_failure(failure_reason(event))
                    raise event
                if len(tasks) == 1 and n > 1:
                    for index in range(1, n):  # unless aborted meanwhile: then they end at once
                        if ticket.aborted:
                            queue.put_nowait(Completion("abort", len(ids), 0, 0, index))
                        else:
                            start(index)
                yield event
                observe_delivery(self.metrics, event)
                done += isinstance(event, Completion)
        finally:
            await self._end(rid, tasks, children, ticket)

    async def _end(self, rid: str, tasks: list[asyncio.Task[None]], children: list[str], ticket: Ticket) -> None:
        """Stops the request's outputs that still run and waits for their releases; only then is its id free."""
        for task in tasks:
            if not task.done():
                task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # only now: the releases (aborts by id on the workers) are over
            self.active.pop(rid, None)
            self.owners.pop(rid, None)
            self.tickets.pop(rid, None)
            self.worker_ids.difference_update(children)
            self.admission.release(ticket)

    def abort(self, request_id: str, owner: str | None) -> bool:
        """Cancels the request if `owner` started it (GenerateInput.owner); False when the id is unknown, the
        request is over, or it is another owner's, which the caller cannot tell apart: ids do not leak."""
        if owner is None or self.owners.get(request_id) != owner:
            return False
        ticket = self.tickets.get(request_id)
        if ticket is not None and self.admission.abort(ticket):
            return True
        tasks = [t for t in self.active.get(request_id, []) if not t.done()]
        for task in tasks:
            task.cancel()
        return bool(tasks)

    async def _run(self, rid: str, index: int, ids: list[int], params: SamplingParams, priority: int,
                   queue: asyncio.Queue[Event | BaseException], deadline: Deadline) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens)
        st = RequestState(rid, index, ids, params, detok, deadline=deadline)
        try:
            await self._dispatch(st, priority, queue)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(st))
            finish(self.metrics, st, "abort", queue)
            raise
        except Exception as e:  # noqa: BLE001 - every failure reaches the client as a clear error
            await asyncio.shield(self._release(st))
            cause = unwrap(e)
            if isinstance(cause, TransferError):  # the decode worker's, under the "fail" policy
                self._count_transfer_failure(st, cause.reason)
            if not st.finished:
                record_finished(self.metrics, st, "error")
            queue.put_nowait(client_error(e, rid))
        finally:
            self._observe_transfer(st, None)
            prefilled_locally(st)
            if st.decode is not None:
                st.decode.inflight -= 1

    async def _dispatch(self, st: RequestState, priority: int, queue: asyncio.Queue[Event | BaseException]) -> None:
        """Runs the output; when its decode worker dies, moves it to another one by token replay (migration.py)
        as long as it may, else raises the error."""
        try:
            await self._dispatch_once(st, priority, queue)
        except Exception as e:  # noqa: BLE001 - raised again unless the output moves
            await self.migrations.resume(st, e, self.pools,
                                         lambda to: self._stream_decode(st, to, None, True, priority, queue))

    async def _dispatch_once(self, st: RequestState, priority: int,
                             queue: asyncio.Queue[Event | BaseException]) -> None:
        """Reserve on a decode worker, prefill where placement.py says (colocated: there), then stream the decode."""
        routing = RoutingRequest(st.ids, self.block_size)
        decode = self._choose(self.pools.decode, self.decode_policy, routing, "decode")
        st.decode = decode
        decode.inflight += 1
        first: PrefillResult | None = None
        local = self.config.mode == "colocated"
        if local:
            st.times.dispatched = time.monotonic()
        else:
            local = await self._reserve(st, decode)
            if not local:
                first = await self._prefill(st, routing)
                if first is not None and await self._emit_first(st, first, queue):
                    return
        await self._stream_decode(st, decode, first, local, priority, queue)

    async def _reserve(self, st: RequestState, decode: WorkerHandle) -> bool:
        """Holds the prompt's blocks on the decode worker; True when it prefills the prompt too (placement.py)."""
        st.reserving = decode.actor.reserve.remote(st.rid, st.ids, st.params, self.config.lease_s)
        reservation = await st.reserving
        st.reserving, st.reserved = None, True
        st.cached_tokens = reservation.cached_tokens
        st.times.dispatched = time.monotonic()
        decision = place(self.config, st, decode, self.pools.prefill)
        self.metrics.record_disagg_decision(decision)
        return decision != "remote_prefill"

    async def _emit_first(self, st: RequestState, first: PrefillResult,
                          queue: asyncio.Queue[Event | BaseException]) -> bool:
        """Sends the token the prefill side sampled; True when it already ends the request."""
        st.cached_tokens = first.cached_tokens  # the prompt tokens whose compute the cache saved
        logprobs = None if first.first_logprob is None else [first.first_logprob]
        emit(self.metrics, st, [first.first_token], queue, logprobs, first.prompt_logprobs)
        reason = first.finish_reason or ("stop" if st.detok.stopped else None)
        if reason is None:
            return False
        await self._release(st)
        finish(self.metrics, st, reason, queue)
        return True

    async def _stream_decode(self, st: RequestState, decode: WorkerHandle, first: PrefillResult | None,
                             local: bool, priority: int, queue: asyncio.Queue[Event | BaseException]) -> None:
        """The decode worker's token stream to the client: after `first`, or from the prompt when local."""
        st.reserved = False  # from here the decode worker's generate owns the blocks
        # A remote request's prompt and params went with reserve(): send only what is new.
        prompt, params = (st.ids, st.params) if local else (None, None)
        # Local after a migration: the tokens the client has are replayed as generated ones.
        generated = list(st.output_ids) if local else None
        arguments = (st.rid, prompt, params, first.first_token if first else None, local, priority, generated)
        st.decoding = True
        async with await decode.open_tokens(arguments) as stream:
            async for batch in stream:
                if batch.kv_failure is not None:  # the KV never arrived: the decode worker recomputed the prompt
                    st.transfer = None
                    self._count_transfer_failure(st, batch.kv_failure)
                self._observe_transfer(st, batch.kv_transport)
                prefilled_locally(st)  # a first batch: the decode worker has prefilled the prompt
                if batch.decode_start is not None and st.times.decode_start is None:  # a migration's is not
                    st.times.decode_start = time.monotonic()
                    if st.times.prefill_done is None:  # prefilled on the decode worker: its first batch ends that
                        st.times.prefill_done = st.times.decode_start
                if not first and st.cached_tokens == 0:  # after a migration the cache may cover generated ones too
                    st.cached_tokens = min(batch.num_cached_tokens, len(st.ids))
                if batch.token_ids:
                    emit_batch(self.metrics, st, batch, queue)
                if st.detok.stopped:
                    await self._release(st)
                    finish(self.metrics, st, "stop", queue)
                    return
                if batch.finished:
                    st.decoding = False
                    if batch.finish_reason == "error":
                        raise WorkerFailed("the decode worker failed while running the request")
                    decode.record_success()
                    finish(self.metrics, st, batch.finish_reason or "stop", queue)
                    return

    async def _prefill(self, st: RequestState, routing: RoutingRequest) -> PrefillResult | None:
        """Runs the remote prefill. None means it failed and the decode worker recomputes. A prefill worker that
        dies before the first token leaves the prompt to another one while the output may move (reprefill.py)."""
        alive = [w for w in self.pools.prefill if w.routable]
        if not alive:
            self._prefill_failed(st, "peer_gone", "no prefill worker is alive and taking requests")
            return None
        prefill = self.prefill_policy.choose(alive, routing)
        self.prefill_policy.record(prefill, routing)
        while True:
            try:
                return await self._prefill_on(st, prefill)
            except PrefillDied as died:
                self._count_transfer_failure(st, "peer_gone")
                again = self.reprefills.target(st, died, self.pools.prefill, routing)
                if again is None:
                    self._prefill_failed(st, "peer_gone", str(died))
                    return None
                prefill = again
                await reserve_again(st, self.config.lease_s)

    async def _prefill_on(self, st: RequestState, prefill: WorkerHandle) -> PrefillResult | None:
        """The remote prefill on `prefill`; None when it failed and the decode worker recomputes, PrefillDied when
        the worker died. While it runs, st.prefill names the worker, so that a cancellation aborts it there
        (_release) rather than leaving the worker to compute the whole prompt for nobody."""
        decode = st.decode
        assert decode is not None
        st.prefill = prefill
        prefill.inflight += 1
        started = time.monotonic()
        try:
            with prefilling(prefill, st):
                result: PrefillResult = await prefill.actor.prefill.remote(
                    st.rid, st.ids, st.params, decode.kv_address, st.cached_tokens
                )
        except asyncio.CancelledError:
            raise  # st.prefill stays set for _release
        except Exception as e:  # noqa: BLE001 - sorted below
            st.prefill = None  # the call is over on the worker
            cause = unwrap(e)
            if isinstance(cause, (InvalidRequest, ResourceExhausted)):
                raise cause from None
            if isinstance(cause, TransferError):
                self._prefill_failed(st, cause.reason, str(cause))
                return None
            prefill.record_failure(self.config.circuit_breaker_failures)
            if is_worker_death(e):
                raise PrefillDied(prefill, e) from e
            self._prefill_failed(st, "peer_gone", f"prefill worker {prefill.name} failed: {type(e).__name__}")
            return None
        finally:
            prefill.inflight -= 1
        st.prefill = None
        prefill.record_success()
        now = time.monotonic()
        dispatched = st.times.dispatched or now
        st.times.prefill_done = max(now - result.transfer_wait_s, dispatched)
        st.times.kv_ready = now
        # Observed once the decode worker says what the KV crossed (its first TokenBatch), or at the end.
        st.transfer = TransferStats(seconds=time.monotonic() - started, num_bytes=result.bytes_sent)
        return result

    def _prefill_failed(self, st: RequestState, reason: str, message: str) -> None:
        """Counts the failure; raises TransferFailed under the fail policy."""
        self._count_transfer_failure(st, reason)
        log.warning("request %s: KV hand-off failed (%s): %s", st.rid, reason, message)
        if self.pools.transfer_config.failure_policy == "fail":
            raise TransferFailed(f"KV hand-off failed ({reason}): {message}")

    def _observe_transfer(self, st: RequestState, transport: str | None) -> None:
        """Observes the output's successful hand-off, once, labelled with what the KV crossed."""
        if st.transfer is not None:
            self.metrics.observe_transfer(dataclasses.replace(st.transfer, transport=transport or "unknown"))
            st.transfer = None

    def _count_transfer_failure(self, st: RequestState, reason: str) -> None:
        """Counts the request's failed KV hand-off once, though both the prefill and the decode side report it."""
        if not st.transfer_failed:
            st.transfer_failed = True
            stats = TransferStats(seconds=0.0, num_bytes=0, failure_reason=transfer_failure_reason(reason))
            self.metrics.observe_transfer(stats)

    def _choose(self, workers: list[WorkerHandle], policy: Policy, routing: RoutingRequest, role: str) -> WorkerHandle:
        alive = [w for w in workers if w.routable]
        if not alive:
            raise Unavailable(f"no {role} worker is alive and taking requests")
        choice = policy.choose(alive, routing)
        policy.record(choice, routing)
        return choice

    async def _release(self, st: RequestState) -> None:
        """Frees the request's KV on both sides (reservation or running request). A reservation still
        being made is waited for, so that it is given back now rather than when its lease runs out."""
        if st.reserving is not None:
            await asyncio.gather(st.reserving, return_exceptions=True)
            st.reserving, st.reserved = None, True
        calls = []
        if st.prefill is not None:
            calls.append(st.prefill.actor.abort.remote(st.rid))
        if st.decode is not None and (st.reserved or st.decoding):
            calls.append(st.decode.actor.abort.remote(st.rid))
        st.reserved = st.decoding = False
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
