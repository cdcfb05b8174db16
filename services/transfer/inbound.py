"""One accepted hand-off connection on the decode side: a ring of receives kept posted ahead.

    UCX progress thread              event loop (one wake-up handles every completion so far)
    msg lands in buffers[i]  ──►  _done(i): on_message(buffers[i]) (parse, scatter)  ──►  re-post buffers[i]

Every KV message is at most MAX_MESSAGE_BYTES (wire.py), and UCX accepts a receive buffer larger
than the message, so `depth` receives of that size are posted up front and each is re-posted as
soon as its message has been handled. No receive waits on Python having read a header, so a burst
of layers lands back to back while Python sleeps, and the loop pays one wake-up per burst instead
of two per layer. The completion is a done-callback on the request's future (no Task per message).
UCX matches the n-th posted receive with the n-th message, so messages are handed over in that
order (a raw K/V must follow its header) even when their completions arrive out of order. Each
posted request is referenced until it completes: ucxx cancels a UCXRequest that is garbage
collected while in flight (found the hard way: sends failed with "Request canceled").
Handling is synchronous on the event loop, so what it decides (e.g. "this request was cancelled:
drop the payload") holds until the buffer is re-posted: UCX only ever writes into these buffers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import torch

from services.transfer.wire import MAX_MESSAGE_BYTES, as_ucx_buffer

log = logging.getLogger(__name__)


class InboundConnection:
    """Keeps `depth` receives posted on `ep`; `ended` resolves when the connection must go.

    `on_message(conn, buf)` gets each received buffer (header frame first) and may raise to end
    the connection; it must have finished with `buf` when it returns (a CUDA kv_cache is
    synchronised before the buffer is re-posted).
    """

    def __init__(
        self,
        conn_id: int,
        ep: Any,
        depth: int,
        device: torch.device,
        on_message: Callable[[InboundConnection, torch.Tensor], None],
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.conn_id = conn_id
        self.ep = ep
        self._on_message = on_message
        self._device = device
        self._buffers = [torch.empty(MAX_MESSAGE_BYTES, dtype=torch.uint8, device=device) for _ in range(depth)]
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ended.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.messages = 0
        self._posted = 0  # receives posted so far: the n-th posted receive gets the n-th message
        self._next = 0  # sequence number of the next message to hand to on_message
        self._landed: dict[int, int] = {}  # sequence number -> ring index, completed but not yet handled
        self.raw_pending: list[tuple[Any, Any, int]] = []  # on_message's state: raw K/V still to come
        # The posted receive of each ring slot: a UCXRequest garbage collected in flight is cancelled.
        self._reqs: list[Any] = [None] * depth

    def start(self) -> None:
        """Post every receive of the ring (call before telling the sender to go ahead)."""
        for i in range(len(self._buffers)):
            self._post(i)

    def end(self, error: BaseException | None = None) -> None:
        """Stop re-posting; pending receives are cancelled when the endpoint is aborted."""
        if self.ended.done():
            return
        if isinstance(error, asyncio.CancelledError):
            error = ConnectionError("a receive was cancelled (endpoint closing)")
        if error is None:
            self.ended.set_result(None)
        else:
            self.ended.set_exception(error)

    def _post(self, i: int) -> None:
        from services.transfer.ucx_ops import recv_request

        seq = self._posted
        req = recv_request(self.ep, as_ucx_buffer(self._buffers[i]))
        self._reqs[i] = req
        self._posted += 1
        req.future.add_done_callback(lambda _f: self._done(seq, i, req))

    def _done(self, seq: int, i: int, req: Any) -> None:
        from services.transfer.ucx_ops import request_error

        error = request_error(req)  # always: it also marks the future's exception as retrieved
        if self.ended.done():
            return
        if error is not None:
            self.end(error)
            return
        self._landed[seq] = i
        try:
            # Hand messages over in wire order (a raw K/V must follow its header), re-posting as we go.
            while self._next in self._landed:
                j = self._landed.pop(self._next)
                self._next += 1
                self.messages += 1
                self._on_message(self, self._buffers[j])
                if self._device.type == "cuda":
                    torch.cuda.current_stream(self._device).synchronize()
                self._post(j)
        except Exception as exc:
            self.end(exc)
