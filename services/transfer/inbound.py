"""One accepted hand-off connection on the decode side: a ring of receives kept posted ahead.

    UCX progress thread              event loop (one wake-up handles every completion so far)
    msg lands in buffers[i]  ──►  _done(i): on_message(buffers[i]) (parse, scatter)  ──►  re-post buffers[i]

Every KV message is at most MAX_MESSAGE_BYTES (wire.py), and UCX accepts a receive buffer larger
than the message, so `depth` receives of that size are posted up front and each is re-posted as
soon as its message has been handled. No receive waits on Python having read a header, so a burst
of layers lands back to back while Python sleeps, and the loop pays one wake-up per burst instead
of two per layer. The completion is a done-callback on the request's future (no Task per message).
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

        req = recv_request(self.ep, as_ucx_buffer(self._buffers[i]))
        req.future.add_done_callback(lambda _f: self._done(i, req))

    def _done(self, i: int, req: Any) -> None:
        from services.transfer.ucx_ops import request_error

        if self.ended.done():
            return
        error = request_error(req)
        if error is not None:
            self.end(error)
            return
        self.messages += 1
        try:
            self._on_message(self, self._buffers[i])
            if self._device.type == "cuda":
                torch.cuda.current_stream(self._device).synchronize()
            self._post(i)
        except Exception as exc:
            self.end(exc)
