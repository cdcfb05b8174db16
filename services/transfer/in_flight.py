"""The sender's sends awaiting their ack, and the failed ones whose memory is still held.

A send is in flight from the moment its header is announced until the decode side acknowledges
it (its future then resolves with the payload bytes, and what it held is released), or until its
connection fails. The memory of a failed send is held another `timeout_s`, since the peer might
still be reading it, and only then released. While anything is in flight or held, a sweep on the
event loop fails sends past their deadline and releases what is due.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.transfer.errors import TransferError


class Hold:
    """What a send keeps from reuse until its ack, or a while after it failed; this one holds nothing."""

    __slots__ = ()

    def release(self) -> None:
        """Let go (idempotent: a send that fails while its connection is dropped may be released twice)."""


NOTHING = Hold()


@dataclass(slots=True)
class Pending:
    """One send in flight; its path sets `hold` before the header goes out."""

    future: concurrent.futures.Future[int]
    conn: Any  # the sender's connection that carried it
    payload_bytes: int
    deadline: float  # monotonic: past it, the send fails and its connection is dropped
    hold: Hold = NOTHING


class InFlight:
    """Sends by sequence; `on_overdue` gets the connection of a send past its deadline (the sweep's)."""

    def __init__(self, timeout_s: float, on_overdue: Callable[[Any], None]) -> None:
        self.timeout_s = timeout_s
        self.pending: dict[int, Pending] = {}  # by sequence
        self.retired: list[tuple[float, Pending]] = []  # (release after, send) of failed sends
        self.sequences = itertools.count(1)  # the next send's
        self._on_overdue = on_overdue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeping = False
        self._closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sweep on `loop` from now on."""
        self._loop = loop

    def close(self) -> None:
        """Sweep no more; `release_retired()` then lets go of what failed sends still hold."""
        self._closed = True

    def __bool__(self) -> bool:
        return bool(self.pending or self.retired)

    def acked(self, conn: Any, sequences: Iterable[int]) -> None:
        """The decode side at `conn` has these: their futures resolve, their memory is released."""
        for sequence in sequences:
            pending = self.pending.get(sequence)
            if pending is not None and pending.conn is conn:
                del self.pending[sequence]
                pending.hold.release()
                if not pending.future.done():
                    pending.future.set_result(pending.payload_bytes)

    def fail(self, conn: Any, error: TransferError, now: float) -> None:
        """Every send on `conn` fails with `error`; their memory is released timeout_s after `now`."""
        until = now + self.timeout_s
        for sequence, pending in list(self.pending.items()):
            if pending.conn is conn:
                del self.pending[sequence]
                self.retired.append((until, pending))
                if not pending.future.done():
                    pending.future.set_exception(error)

    def sweep_soon(self) -> None:
        """Make sure a sweep is due (thread-safe)."""
        if not self._sweeping and self._loop is not None:
            self._sweeping = True
            self._loop.call_soon_threadsafe(self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        overdue = dict.fromkeys(p.conn for p in self.pending.values() if p.deadline < now)
        for conn in overdue:  # each connection once
            self._on_overdue(conn)
        self.release_retired(now)
        self._sweeping = False
        if self and not self._closed:
            assert self._loop is not None
            self._sweeping = True
            self._loop.call_later(min(1.0, self.timeout_s / 4), self._sweep)

    def release_retired(self, now: float | None = None) -> None:
        """Release the failed sends held until before `now` (None: all of them)."""
        keep = []
        for until, pending in self.retired:
            if now is None or until < now:
                pending.hold.release()
            else:
                keep.append((until, pending))
        self.retired = keep
