"""Posting tag sends and receives on a ucxx endpoint without awaiting each one.

`ucxx.Endpoint.send/recv` post and then wait, one coroutine per message. The hand-off instead
posts first and learns of completion through the request's asyncio future: `post_send`/`post_recv`
wrap that in a coroutine (handshake, tests), while the data path uses `send_request`/
`recv_request` plus a done-callback on `request.future`, which costs no Task and lets one
event-loop wake-up finish every request UCX completed meanwhile. UCX matches messages of one tag in
posting order, so posting order is wire order. This uses the endpoint's internal handle and tags,
pinned to ucxx 0.52 (the only module that does so); import it only after `ucx_runtime.acquire()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from ucxx._lib.arr import Array
from ucxx._lib.libucxx import UCXCloseError
from ucxx.types import Tag, TagMaskFull


def _check_open(ep: Any) -> None:
    if ep._ep is None:
        raise UCXCloseError("Endpoint closed")
    ep._ep.raise_on_error()
    if ep.closed:
        raise UCXCloseError("Endpoint closed")


def send_request(ep: Any, buf: object) -> Any:
    """Post a send of `buf` now and return the UCX request; `buf` must stay alive and unchanged until it completes."""
    _check_open(ep)
    return ep._ep.tag_send(Array(buf), Tag(ep._tags["msg_send"]))


def recv_request(ep: Any, buf: object) -> Any:
    """Post a receive into `buf` (which may be larger than the message) and return the UCX request."""
    _check_open(ep)
    return ep._ep.tag_recv(Array(buf), Tag(ep._tags["msg_recv"]), TagMaskFull)


def request_error(req: Any) -> BaseException | None:
    """The failure of a request whose future is done, or None when it succeeded."""
    fut: asyncio.Future[Any] = req.future
    if fut.cancelled():
        return asyncio.CancelledError()
    exc = fut.exception()
    if exc is not None:
        return exc
    try:
        req.check_error()
    except Exception as err:
        return err
    return None


async def wait_request(req: Any, buf: object) -> None:
    """Await a posted request; raises its UCX error. Holds `buf` alive until then."""
    # Shielded: if the waiter is cancelled, the request still ends (e.g. cancelled by an abort),
    # and its error must not be logged as never retrieved.
    req.future.add_done_callback(lambda f: f.cancelled() or f.exception())
    await asyncio.shield(req.future)
    error = request_error(req)
    del buf
    if error is not None:
        raise error


def post_send(ep: Any, buf: object) -> Coroutine[Any, Any, None]:
    """Post a send of `buf` now; await the returned coroutine for completion."""
    return wait_request(send_request(ep, buf), buf)


def post_recv(ep: Any, buf: object) -> Coroutine[Any, Any, None]:
    """Post a receive into `buf` now; await the returned coroutine for completion."""
    return wait_request(recv_request(ep, buf), buf)
