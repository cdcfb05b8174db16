"""The receiver's fast path into a host KV cache: expected requests as routes of a native.Sink.

Each expected request is a route, and each connection whose sender's cache is mapped here a
source. A header from a source for a routed request is checked, copied and kept for its ack by
the data path's message callback (native/kvx_route.c), as the receiver would do in Python; Python
wakes once, when the request's KV is all in place (EVENT_ROUTE_DONE), and when acks fall due
(EVENT_ACKS_DUE). Anything else (malformed, out of bounds, from a ring, for a request not routed)
reaches the receiver's own handling, which also refuses what is bad. Removing a route or a source
waits for a placement in progress, so cancelling still leaves nothing in flight.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import NamedTuple

from services.transfer import native
from services.transfer.expected import ExpectedRequest
from services.transfer.recv_paths import SharedRegion

log = logging.getLogger(__name__)


class _Route(NamedTuple):
    handle: int
    request: ExpectedRequest


class Routes:
    """The routes and sources of one receiver's sink; a request's route key is in `ExpectedRequest.route`."""

    def __init__(self, sink: native.Sink) -> None:
        self._sink = sink
        self._routes: dict[int, _Route] = {}  # by key
        self._keys = itertools.count(1)

    def add(self, exp: ExpectedRequest) -> None:
        key = next(self._keys)
        self._routes[key] = _Route(self._sink.route(key, exp.request_id.encode(), exp.token_start, exp.slots), exp)
        exp.route = key

    def remove(self, exp: ExpectedRequest) -> None:
        """Remove the request's route: once this returns, nothing more is written for it."""
        route = self._routes.pop(exp.route, None)
        if route is not None:
            self._sink.unroute(route.handle)
        exp.route = 0

    def done(self, payload: bytes) -> ExpectedRequest | None:
        """The request an EVENT_ROUTE_DONE says is all in place (and since when: it completes it), if still routed."""
        key, at = native.ROUTE_DONE.unpack(payload)
        route = self._routes.get(key)
        if route is None:
            return None
        route.request.complete(at)
        return route.request

    def mark(self, exp: ExpectedRequest, layer: int, a: int, b: int) -> None:
        """Record tokens [a, b) of `layer` of a routed request as placed by Python (which may complete it)."""
        if self._sink.mark(self._routes[exp.route].handle, layer, a, b):
            exp.complete(time.monotonic())

    def source_of(self, exp: ExpectedRequest) -> int:
        """The tag of the source that placed KV through the request's route (0: none, or not routed)."""
        route = self._routes.get(exp.route) if exp.route else None
        return self._sink.route_source(route.handle) if route is not None else 0

    def add_source(self, conn: int, tag: int, cache: SharedRegion) -> None:
        """Let the callback place headers of connection `conn` (its tag) from the mapped `cache` (only faster)."""
        try:
            self._sink.source(tag, cache.address, cache.length, cache.mapped)
        except OSError as exc:
            log.warning("KV connection %d: its headers go through Python (%s)", conn, exc)

    def remove_source(self, tag: int) -> list[int]:
        """Stop placing the connection's headers (before its cache is unmapped); the acks still due for it."""
        acks = self._sink.take_acks(tag)
        self._sink.unsource(tag)
        return acks

    def take_acks(self, tag: int) -> list[int]:
        return self._sink.take_acks(tag)

    def close(self) -> None:
        self._sink.close()
