"""The receiver's expected requests: announced, partly arrived, complete or failed, and their routes.

A request is expected from `add` until it is waited for or cancelled; headers for anything else are
acknowledged and dropped. Where the KV cache has a sink (host memory), every expected request is
also a route of it (routes.py), and its arrival is tracked there rather than in Python.
"""

from __future__ import annotations

import asyncio

from services.transfer.errors import TransferError
from services.transfer.expected import ExpectedRequest, KVArrival
from services.transfer.fingerprint import KVFingerprint
from services.transfer.recv_paths import SHM, joined
from services.transfer.routes import Routes


class Expectations:
    def __init__(self, fp: KVFingerprint, num_blocks: int, token_bytes: int) -> None:
        self._fp = fp
        self._num_blocks = num_blocks
        self._token_bytes = token_bytes
        self.by_id: dict[str, ExpectedRequest] = {}  # read-only outside this class
        self._partial: set[ExpectedRequest] = set()  # requests with some of their KV, waiting for the rest
        self.routes: Routes | None = None  # set once the receiver has a sink

    def add(self, request_id: str, block_ids: list[int], token_start: int, token_end: int) -> None:
        if request_id in self.by_id:
            raise ValueError(f"request {request_id!r} is already expected")
        fp = self._fp
        exp = ExpectedRequest(
            request_id, block_ids, token_start, token_end, fp.block_size, fp.num_layers, self._num_blocks
        )
        exp.pieces(0, exp.num_tokens, self._token_bytes)  # worked out now, not when the first layer lands
        if self.routes is not None:
            self.routes.add(exp)
        self.by_id[request_id] = exp

    async def wait(self, request_id: str, limit: float) -> KVArrival:
        """Until the request's KV is all in place (when, and over what), forgetting it then; see KVReceiver."""
        exp = self.by_id.get(request_id)
        if exp is None:
            raise KeyError(f"request {request_id!r} is not expected (never announced, or already waited for)")
        try:
            try:
                at = await asyncio.wait_for(asyncio.shield(exp.future), limit)
            except TimeoutError:
                self.fail(exp, TransferError("timeout", f"request {request_id!r}: KV did not arrive within {limit}s"))
                at = exp.future.result()  # it completed just in time, or this raises its error
            return KVArrival(at, joined(exp.transports))
        finally:
            self._unroute(exp)
            if self.by_id.get(request_id) is exp:
                del self.by_id[request_id]

    def cancel(self, request_id: str) -> None:
        exp = self.by_id.pop(request_id, None)
        if exp is not None:
            self.fail(exp, TransferError("cancelled", f"request {request_id!r} was cancelled"))

    def ids(self) -> list[str]:
        return list(self.by_id)

    def pending(self) -> list[str]:
        return [rid for rid, exp in self.by_id.items() if not exp.done]

    def mark(self, exp: ExpectedRequest, layer: int, a: int, b: int) -> bool:
        """Tokens [a, b) of `layer` are in place; True when that completed the request."""
        if exp.route and self.routes is not None:  # its route keeps what has arrived
            self.routes.mark(exp, layer, a, b)
            if exp.done and self.routes.source_of(exp):
                exp.transports.add(SHM)  # the callback placed the rest
        else:
            exp.mark(layer, a, b)
        if exp.done:
            self._partial.discard(exp)
            return True
        self._partial.add(exp)
        return False

    def route_done(self, payload: bytes) -> None:
        """A route's request has all of its KV in place (the EVENT_ROUTE_DONE's payload says since when)."""
        done = self.routes.done(payload) if self.routes is not None else None
        if done is not None:
            done.transports.add(SHM)  # routes place only what they copy out of a mapped cache
            self._partial.discard(done)

    def arriving(self) -> bool:
        """Whether some request has part of its KV and waits for the rest (more headers are due)."""
        self._partial = {exp for exp in self._partial if not exp.done}
        return bool(self._partial)

    def fail_sourced(self, conn: int, tag: int, error: TransferError) -> None:
        """Fail the requests that connection `conn` (its tag: `tag`) delivered KV for."""
        for exp in list(self.by_id.values()):
            routed_from = self.routes.source_of(exp) if self.routes is not None else 0
            if conn in exp.sources or (tag and routed_from == tag):
                self.fail(exp, error)

    def fail(self, exp: ExpectedRequest, error: TransferError) -> None:
        self._unroute(exp)
        exp.fail(error)

    def _unroute(self, exp: ExpectedRequest) -> None:
        """Remove the request's route: once this returns, nothing more is written for it."""
        if self.routes is not None:
            self.routes.remove(exp)
        exp.route = 0
