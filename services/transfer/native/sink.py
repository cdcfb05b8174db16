"""A KV cache that the data path's message callback places routed headers into (kvx_route.c)."""

from __future__ import annotations

import array
import ctypes
import os
import struct

EVENT_ROUTE_DONE = 3  # payload: the route's key and when its KV was all in place (ROUTE_DONE)
EVENT_ACKS_DUE = 4  # routed headers wait for their acks: Sink.take_acks
ROUTE_DONE = struct.Struct("<Qd")


class Sink:
    """A KV cache that routed headers are placed into from the message callback (see kvx_route.c).

    `source` names a connection (by its tag) whose sender's cache is mapped here; `route` one
    expected request. A header from a source for a routed request is copied into place and its
    sequence kept for `take_acks`, with no event; the route's completion is an EVENT_ROUTE_DONE.
    Everything else arrives as EVENT_MESSAGE, as without a sink. `unroute`, `unsource` and
    `close` are synchronous: once they return, nothing more is written through what they removed.
    """

    def __init__(self, so: ctypes.CDLL, handle: int) -> None:
        self._lib = so
        self._h: int | None = handle
        self._acks = (ctypes.c_uint64 * 256)()

    def source(self, tag: int, address: int, length: int, mapped: int) -> None:
        err = self._lib.kvx_sink_source(self._h, tag, address, length, mapped)
        if err:
            raise OSError(err, f"adding a source for tag {tag}: {os.strerror(err)}")

    def unsource(self, tag: int) -> None:
        self._lib.kvx_sink_unsource(self._h, tag)

    def take_acks(self, tag: int) -> list[int]:
        """The sequences placed from `tag`'s source since the last call."""
        while True:
            n = self._lib.kvx_sink_take_acks(self._h, tag, self._acks, len(self._acks))
            if n >= 0:
                return self._acks[:n]
            self._acks = (ctypes.c_uint64 * (2 * -n))()

    def route(self, key: int, request_id: bytes, token_start: int, slots: list[int]) -> int:
        """Route a request whose tokens from `token_start` go to `slots` (checked by the caller); a handle."""
        table = array.array("Q", slots)
        h = self._lib.kvx_route_open(
            self._h, key, request_id, len(request_id), token_start, len(table), table.buffer_info()[0]
        )
        if not h:
            raise ValueError(f"cannot route request {request_id!r} (routed already, or no memory)")
        return int(h)

    def unroute(self, route: int) -> None:
        self._lib.kvx_route_close(route)

    def mark(self, route: int, layer: int, a: int, b: int) -> bool:
        """Record tokens [a, b) of `layer` as written by the caller; True when that completed the route."""
        return bool(self._lib.kvx_route_mark(route, layer, a, b))

    def route_source(self, route: int) -> int:
        """The tag of the source that placed KV through the route (0: none)."""
        return int(self._lib.kvx_route_source(route))

    def close(self) -> None:
        h, self._h = self._h, None
        if h:
            self._lib.kvx_sink_close(h)
