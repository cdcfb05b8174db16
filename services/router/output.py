"""What the router sends a client for one output: its tokens as Chunks (with the text they complete, stop strings
applied), one Completion at the end, and the metrics both feed.

A token's way to the client is timed in four stages, each observed per token in pdserve_token_stage_seconds:

    engine_step        the engine step that made it (the decode worker's own clock)
    worker_to_router   from the end of that step to the router holding its TokenBatch: the worker's event loop,
                       Ray's streaming hop, the router's event loop (the two hosts' clocks, when they differ)
    router             detokenizing, the stop check and the metrics, here
    router_to_client   from the Chunk queued here to the front end asking for the next one: serialization and
                       the write to the client's connection
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.engine.stats import FinishedRequestStats
from services.router.messages import Chunk, Completion, Event
from services.router.metrics import Metrics
from services.router.request_state import RequestState
from services.worker.messages import TokenBatch

log = logging.getLogger(__name__)


def emit(metrics: Metrics, st: RequestState, token_ids: list[int], queue: asyncio.Queue[Event | BaseException],
         logprobs: list[TokenLogprob] | None = None, prompt_logprobs: PromptLogprobs | None = None) -> None:
    """Queues the output's new tokens for the client."""
    now = time.monotonic()
    if st.times.first_token is None:
        st.times.first_token = now
        metrics.observe_first_token(now - st.times.arrival)
    elif st.last_emit is not None:
        gap = (now - st.last_emit) / len(token_ids)
        for _ in token_ids:
            metrics.observe_token_gap(gap)
    st.last_emit = now
    if st.output_ids:  # they came with the first token (a migrated output's new worker sends them again)
        prompt_logprobs = None
    st.output_ids += token_ids
    metrics.observe_generated_tokens(len(token_ids))
    text = st.detok.add(token_ids)
    queue.put_nowait(Chunk(token_ids, text, st.index, logprobs, prompt_logprobs, emitted_at=time.monotonic()))


def emit_batch(metrics: Metrics, st: RequestState, batch: TokenBatch,
               queue: asyncio.Queue[Event | BaseException]) -> None:
    """Queues a decode worker's TokenBatch, timing the stages of its tokens' way here."""
    received, started = time.time(), time.perf_counter()
    emit(metrics, st, batch.token_ids, queue, batch.logprobs, batch.prompt_logprobs)
    count = len(batch.token_ids)
    if batch.produced_at:
        metrics.observe_token_stage("engine_step", batch.step_seconds / count, count)
        metrics.observe_token_stage("worker_to_router", max(received - batch.produced_at, 0.0), count)
    metrics.observe_token_stage("router", (time.perf_counter() - started) / count, count)


def observe_delivery(metrics: Metrics, event: Event) -> None:
    """The front end took `event` and asks for the next: the router_to_client stage of its tokens."""
    if isinstance(event, Chunk) and event.token_ids and event.emitted_at:
        count = len(event.token_ids)
        metrics.observe_token_stage("router_to_client", (time.monotonic() - event.emitted_at) / count, count)


def finish(metrics: Metrics, st: RequestState, reason: str, queue: asyncio.Queue[Event | BaseException]) -> None:
    """Ends the output: the text the detokenizer held back, then its Completion."""
    if st.finished:
        return
    rest = st.detok.flush()
    if rest:
        queue.put_nowait(Chunk([], rest, st.index))
    record_finished(metrics, st, reason)
    queue.put_nowait(Completion(reason, len(st.ids), st.completion_tokens, st.cached_tokens, st.index))


def record_finished(metrics: Metrics, st: RequestState, reason: str) -> None:
    """Marks the output finished and observes it: reason "error" for one that failed."""
    st.finished = True
    st.times.finished = time.monotonic()
    try:
        metrics.observe_finished(FinishedRequestStats(
            finish_reason=reason, prompt_tokens=len(st.ids), generation_tokens=st.completion_tokens,
            cached_tokens=st.cached_tokens, times=st.times))
    except ValueError:
        log.exception("request %s: inconsistent stage times %s", st.rid, st.times)
