"""A stand-in decode actor for router tests without Ray: its `generate`, an async generator of TokenBatches, is
served over a real TokenServer (each batch sent as it is yielded), which its `ready` starts on first use, as
DecodeWorker.ready does. And the batches a real DecodeWorker's generate sends, for tests that call it in-process."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.worker.messages import TokenBatch, WorkerInfo
from services.worker.token_stream import SendBatch, TokenServer


async def generated(worker: Any, *args: Any, **kwargs: Any) -> list[TokenBatch]:
    """Every batch `worker.generate(*args, **kwargs)` (a DecodeWorker's) sends, once the call returns."""
    batches: list[TokenBatch] = []
    await worker.generate(*args, send=batches.append, **kwargs)
    return batches


def serving_ready(actor: Any, info: WorkerInfo) -> Callable[..., Awaitable[WorkerInfo]]:
    """`actor.ready`'s behaviour: `info` with the address and secret of a TokenServer over `actor.generate`
    (looked up per call, so that a test may swap it)."""
    server = TokenServer(lambda *args, send: _send_each(actor.generate(*args), send))

    async def ready(*_: Any) -> WorkerInfo:
        address = await server.start("127.0.0.1")
        return dataclasses.replace(info, token_address=address, token_secret=server.secret)

    return ready


async def _send_each(batches: AsyncIterator[TokenBatch], send: SendBatch) -> None:
    async for batch in batches:
        send(batch)
