"""Runs an LLMEngine in its own thread and serves it to asyncio code (the worker actors).

Every engine mutation happens on the engine thread: callers submit commands that run
between steps, and outputs come back per request through asyncio queues, or to a sink the
engine thread calls itself (a decode worker's token stream sends each batch from there).

    asyncio loop ── call(fn) ──► command queue ──► engine thread: fn(engine); step(); ...
    asyncio loop ◄── outputs (call_soon_threadsafe) ──┘                    └──► sink(output)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from services.engine.engine import LLMEngine
from services.engine.models.llama import LayerKVHook
from services.engine.request import RequestStatus
from services.engine.scheduler import RequestOutput, SchedulerOutput

T = TypeVar("T")
# Takes a request's outputs, on the engine thread (or the loop's, for the outputs the workers make there).
Sink = Callable[[RequestOutput], None]
log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.layer_hook: Callable[[SchedulerOutput], LayerKVHook | None] | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future[Any]]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._sinks: dict[str, Sink] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._commands.put((lambda e: None, Future()))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs fn(engine) on the engine thread between steps and returns its result."""
        future: Future[T] = Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def open_sink(self, request_id: str, sink: Sink) -> None:
        """The request's outputs go to `sink`, called on the engine thread as each step ends; outputs made on
        the loop (dispatch) go there too. Open it before the request can make outputs."""
        self._sinks[request_id] = sink

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._sinks.pop(request_id, None)

    async def outputs(
        self, request_id: str, stream: asyncio.Queue[RequestOutput]
    ) -> AsyncIterator[list[RequestOutput]]:
        """Yields the request's outputs in batches (all that are ready), until it finishes.

        Leaving early (the consumer stops) aborts the request in the engine.
        """
        finished = False
        try:
            while not finished:
                batch = [await stream.get()]
                while not stream.empty():
                    batch.append(stream.get_nowait())
                finished = batch[-1].finished
                yield batch
        finally:
            self.close_stream(request_id)
            if not finished:
                await self.call(lambda e: e.abort([request_id], RequestStatus.FINISHED_ABORTED))

    def _run(self) -> None:
        while not self._stopped:
            block = not self.engine.has_unfinished()
            try:
                while True:
                    fn, future = self._commands.get(block=block)
                    block = False
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(self.engine))
                        except BaseException as e:  # noqa: BLE001 - handed to the caller
                            future.set_exception(e)
            except queue.Empty:
                pass
            if self._stopped or not self.engine.has_unfinished():
                continue
            try:
                started = time.time()
                outputs = self.engine.step(self.layer_hook)
                ended = time.time()
                for out in outputs:
                    out.step_seconds, out.produced_at = ended - started, ended
            except Exception:  # noqa: BLE001 - a failed step fails its requests, not the worker
                log.exception("engine step failed; failing %d requests", len(self.engine.scheduler.requests))
                self._fail_all()
                continue
            queued = [out for out in outputs if not self._to_sink(out)]
            if queued and self.loop is not None:
                self.loop.call_soon_threadsafe(self.dispatch, queued)

    def dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
            else:
                self._to_sink(out)

    def _to_sink(self, out: RequestOutput) -> bool:
        """Hands `out` to its request's sink; False where the request has none."""
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return False
        try:
            sink(out)
        except Exception:  # noqa: BLE001 - a failing sink loses its request's output, not the engine
            log.exception("the output sink of request %s failed", out.request_id)
        return True

    def _fail_all(self) -> None:
        ids = list(self.engine.scheduler.requests)
        self.engine.abort(ids, RequestStatus.FINISHED_ERROR)
        failed = [RequestOutput(rid, [], True, "error", 0, 0, 0) for rid in ids]
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.dispatch, failed)
