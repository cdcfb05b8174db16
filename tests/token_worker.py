"""A stand-in decode actor for router tests without Ray: its `generate` is served over a real TokenServer, which
its `ready` starts on first use, as DecodeWorker.ready does."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from services.worker.messages import WorkerInfo
from services.worker.token_stream import TokenServer


def serving_ready(actor: Any, info: WorkerInfo) -> Callable[..., Awaitable[WorkerInfo]]:
    """`actor.ready`'s behaviour: `info` with the address and secret of a TokenServer over `actor.generate`
    (looked up per call, so that a test may swap it)."""
    server = TokenServer(lambda *args: actor.generate(*args))

    async def ready(*_: Any) -> WorkerInfo:
        address = await server.start("127.0.0.1")
        return dataclasses.replace(info, token_address=address, token_secret=server.secret)

    return ready
