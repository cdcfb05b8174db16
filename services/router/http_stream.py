"""Streaming and disconnects: the SSE response, the chunks it sends, and the cancellation of a router request when
its client goes away (streaming or not), which aborts the request and frees its KV on both sides."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from services.router.errors import Unavailable
from services.router.http_errors import http_error_for
from services.router.messages import Chunk, Event
from services.router.openai_format import CompletionFormat, Outputs
from services.router.openai_responses import ErrorInfo, ErrorResponse

_T = TypeVar("_T")


class ClientGone(Exception):
    """The client disconnected before the response started."""


def sse(item: BaseModel) -> bytes:
    return f"data: {item.model_dump_json()}\n\n".encode()


class EventStream(StreamingResponse):
    """An SSE response that stops, and closes its body iterator (so the router request ends), when the client
    disconnects. StreamingResponse's own __call__ is replaced: its anyio cancel scope cancels again at every
    await in the router's cleanup, while one plain asyncio cancellation lets that cleanup run to the end."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(receive, pump())
        except ClientGone:
            pass
        finally:
            await close_iterator(self.body_iterator)


async def collect(events: AsyncIterator[Event], n: int) -> Outputs:
    """The n outputs of a request that is not streamed, once all are done."""
    outputs = Outputs(n)
    async for event in events:
        outputs.add(event)
        if outputs.done:
            return outputs
    raise Unavailable("the request ended without a completion")


async def stream_events(events: AsyncIterator[Event], first: Event, fmt: CompletionFormat,
                        include_usage: bool) -> AsyncIterator[bytes]:
    """SSE lines: the chunks of the n outputs (told apart by the choice index), a chunk with each output's
    finish_reason, the usage chunk if asked, then [DONE].
    An error after the 200 went out is sent as an error object in the stream, as vLLM does."""
    try:
        for opening in fmt.opening():
            yield sse(opening)
        outputs = Outputs(fmt.n)
        event: Event | None = first
        while event is not None:
            outputs.add(event)
            item: BaseModel | None = fmt.chunk(event) if isinstance(event, Chunk) else fmt.final(event)
            if item is not None:
                yield sse(item)
            if outputs.done:
                break
            event = await anext(events, None)
        if not outputs.done:
            raise Unavailable("the request ended without a completion")
        if include_usage:
            yield sse(fmt.usage_chunk(outputs.usage()))
    except Exception as e:  # noqa: BLE001 - every failure reaches the client as an error object
        err = http_error_for(e)
        yield sse(ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, code=err.code)))
    finally:
        await close_iterator(events)
    yield b"data: [DONE]\n\n"


async def until_disconnect(receive: Receive, work: Awaitable[_T]) -> _T:
    """Awaits `work`, cancelling it (which closes the router iterator) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def close_iterator(iterator: object) -> None:
    """Closes an async generator (a no-op once it has finished), which runs its cleanup now, not at GC."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
