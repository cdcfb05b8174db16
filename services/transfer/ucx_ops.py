"""Posting tag sends and receives on a ucxx endpoint without awaiting each one.

`ucxx.Endpoint.send/recv` post and then wait. Posting first lets a header and its K and V payloads
be in flight together (and the receiver keep its next header receive posted while a payload
lands), which removes one event-loop round trip per message. UCX matches messages of one tag in
posting order, so posting order is wire order. This uses the endpoint's internal handle and tags,
pinned to ucxx 0.52 (the only module that does so); import it only after `ucx_runtime.acquire()`.
"""

from __future__ import annotations

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


async def _completion(req: Any, buf: Array) -> None:
    # UCX reads/writes `buf` until the request completes; holding it here keeps it alive that long.
    await req.wait()
    del buf


def post_send(ep: Any, buf: object) -> Coroutine[Any, Any, None]:
    """Post a send of `buf` now; await the returned coroutine for completion."""
    _check_open(ep)
    arr = Array(buf)
    req = ep._ep.tag_send(arr, Tag(ep._tags["msg_send"]))
    return _completion(req, arr)


def post_recv(ep: Any, buf: object) -> Coroutine[Any, Any, None]:
    """Post a receive into `buf` now; await the returned coroutine for completion."""
    _check_open(ep)
    arr = Array(buf)
    req = ep._ep.tag_recv(arr, Tag(ep._tags["msg_recv"]), TagMaskFull)
    return _completion(req, arr)
