"""Coalescing of one connection's outgoing KV parts into as few UCX messages as possible.

    send(layer 0) ─┐   same event-loop iteration      one staging buffer, one tag send
    send(layer 1) ─┼─► [frame|K|V][frame|K|V][frame|K|V][0000] ─────────────────────►
    send(layer 2) ─┘   flushed by call_soon (or when the next part would not fit)

Every part is packed (memcpy) into the open message; the message is posted at the end of the
loop iteration that opened it, so a lone send is not delayed, while sends that queue up (a
prefill thread outrunning the loop, or several requests at once) share one UCX request and one
completion wake-up on each side. A 4-byte zero length ends a message shorter than
MAX_MESSAGE_BYTES (see wire.py). Buffers are all MAX_MESSAGE_BYTES, so the pool recycles them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import torch

from services.transfer.staging import StagingPool
from services.transfer.wire import (
    FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    RAW_MIN_PAYLOAD_BYTES,
    as_ucx_buffer,
    encode_frame,
    write_frame,
)

END_MARK_BYTES = 4


class _Message:
    def __init__(self, buf: torch.Tensor, done: asyncio.Future[None]) -> None:
        self.buf = buf
        self.done = done
        self.used = 0
        self.posted = False


class Outbox:
    """Packs KV parts for endpoint `ep` and posts them; `add` returns the future of the carrying message."""

    def __init__(self, ep: Any, pool_for: Callable[[torch.device], StagingPool]) -> None:
        self.ep = ep
        self._pool_for = pool_for
        self._open: _Message | None = None
        self.messages = 0  # UCX messages posted so far
        # Requests in flight: a UCXRequest that is garbage collected before completing is cancelled.
        self._inflight: set[Any] = set()

    def _track(self, req: Any) -> None:
        self._inflight.add(req)
        req.future.add_done_callback(lambda _f: self._inflight.discard(req))

    def add(self, header: Any, k: torch.Tensor, v: torch.Tensor) -> asyncio.Future[Any]:
        """Queue header (a KVHeader) and K, V (contiguous, same device); returns what to await.

        Small parts are packed into the open message; large ones go zero-copy (`_add_raw`).
        """
        half = k.numel() * k.element_size()
        need = FRAME_BYTES + 2 * half
        if need > MAX_MESSAGE_BYTES:
            raise ValueError(f"a KV part of {need} bytes exceeds the {MAX_MESSAGE_BYTES}-byte message limit")
        if 2 * half >= RAW_MIN_PAYLOAD_BYTES:
            return self._add_raw(header, k, v)
        msg = self._open
        if msg is not None and (msg.used + need > MAX_MESSAGE_BYTES or msg.buf.device != k.device):
            self.flush()
            msg = None
        if msg is None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            msg = self._open = _Message(self._pool_for(k.device).take(MAX_MESSAGE_BYTES), done)
            loop.call_soon(self._flush_message, msg)
        at = msg.used
        buf = msg.buf
        if buf.device.type == "cpu":
            write_frame(header, buf[at : at + FRAME_BYTES].numpy())
        else:
            frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
            write_frame(header, frame.numpy())
            buf[at : at + FRAME_BYTES].copy_(frame)
        buf[at + FRAME_BYTES : at + FRAME_BYTES + half].copy_(k.reshape(-1).view(torch.uint8))
        buf[at + FRAME_BYTES + half : at + need].copy_(v.reshape(-1).view(torch.uint8))
        msg.used = at + need
        return msg.done

    def _add_raw(self, header: Any, k: torch.Tensor, v: torch.Tensor) -> asyncio.Future[Any]:
        """Post a flagged frame, then K, then V as three consecutive messages (no copy of K and V)."""
        from services.transfer.ucx_ops import send_request

        self.flush()  # wire order: whatever was queued before goes first
        if k.is_cuda:
            torch.cuda.current_stream(k.device).synchronize()
        bufs = [encode_frame(header, raw_follows=True), as_ucx_buffer(k), as_ucx_buffer(v)]
        reqs = [send_request(self.ep, buf) for buf in bufs]  # no await in between: contiguous on the wire
        for req in reqs:
            self._track(req)
        self.messages += 3
        done = asyncio.gather(*(r.future for r in reqs))

        def release(f: asyncio.Future[Any]) -> None:  # holds the buffers alive until UCX is done
            bufs.clear()
            if not f.cancelled():
                f.exception()  # retrieved: the sender reports it

        done.add_done_callback(release)
        return done

    def flush(self) -> None:
        """Post the open message now."""
        if self._open is not None:
            self._flush_message(self._open)

    def _flush_message(self, msg: _Message) -> None:
        from services.transfer.ucx_ops import send_request

        if msg.posted:
            return
        msg.posted = True
        if self._open is msg:
            self._open = None
        length = msg.used
        if length + END_MARK_BYTES <= MAX_MESSAGE_BYTES:
            msg.buf[length : length + END_MARK_BYTES] = 0
            length += END_MARK_BYTES
        pool = self._pool_for(msg.buf.device)
        try:
            if msg.buf.is_cuda:
                torch.cuda.current_stream(msg.buf.device).synchronize()  # UCX reads outside torch's streams
            req = send_request(self.ep, as_ucx_buffer(msg.buf[:length]))
        except Exception as exc:
            pool.give(msg.buf)
            msg.done.set_exception(exc)
            return
        self.messages += 1
        self._track(req)
        req.future.add_done_callback(lambda _f: self._sent(msg, req, pool))

    @staticmethod
    def _sent(msg: _Message, req: Any, pool: StagingPool) -> None:
        from services.transfer.ucx_ops import request_error

        error = request_error(req)
        pool.give(msg.buf)
        if msg.done.done():
            return
        if error is None:
            msg.done.set_result(None)
        else:
            if isinstance(error, asyncio.CancelledError):
                error = ConnectionError("send cancelled")
            msg.done.set_exception(error)
