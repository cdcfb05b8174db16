"""The decode side's plan for one incoming request: which slots its tokens go to, what has arrived.

    token positions     token_start                         token_end
                             │◄──────── expected range ────────►│
    a header's range           [hdr.token_start, +num_tokens)   must lie inside it
    slot of position p:  block_ids[p // block_size] * block_size + p % block_size

A header's tokens are fetched as pieces, one per run of consecutive slots (a block, or several
blocks that happen to be adjacent) on both sides: the source is either contiguous (a staged or
registered tensor) or blocks of the sender's shared KV cache. `pieces()` lists them once per
distinct range and source, which every layer then reuses. What has arrived is one bit per token
per layer, kept in Python ints, so marking a layer costs a few integer operations whatever the
range. A request that the receiver routes (see receiver.py) is tracked in C instead, and `route`
holds its key; `complete` then ends it. The future's result is the monotonic time at which
the last of the KV was in place; `transports` gathers what the KV crossed to get there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.transfer.errors import TransferError
from services.transfer.native import Pieces


@dataclass(frozen=True)
class KVArrival:
    """A request's KV is all in place: since when (time.monotonic()), and what it came over.

    `transport`: "shm" (copied out of the sender's memory mapped here, same host), or the UCX
    transports of the connection it was read on ("tcp", "rc_mlx5", "cma", ...); several joined
    by "+", sorted.
    """

    at: float
    transport: str


def slot_ids(block_ids: np.ndarray | Sequence[int], token_start: int, token_end: int, block_size: int) -> np.ndarray:
    """The cache slot of every token position in [token_start, token_end), given the request's blocks."""
    pos = np.arange(token_start, token_end, dtype=np.int64)
    return np.asarray(block_ids, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


class ExpectedRequest:
    """Bookkeeping of one request: destination slots, per-layer arrival mask, completion future."""

    def __init__(
        self,
        request_id: str,
        block_ids: list[int],
        token_start: int,
        token_end: int,
        block_size: int,
        num_layers: int,
        num_blocks: int,
    ) -> None:
        if not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not 0 <= token_start < token_end:
            raise ValueError(f"need 0 <= token_start < token_end, got [{token_start}, {token_end})")
        needed = (token_end + block_size - 1) // block_size
        if len(block_ids) < needed:
            raise ValueError(
                f"request {request_id!r}: tokens up to {token_end} need {needed} blocks of {block_size}, "
                f"got {len(block_ids)} block ids"
            )
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            raise ValueError(f"request {request_id!r}: block ids must lie in [0, {num_blocks})")
        self.request_id = request_id
        self.token_start = token_start
        self.token_end = token_end
        self.block_size = block_size
        slots = slot_ids(ids, token_start, token_end, block_size)
        # Each offset's slot, and the offsets at which a run of consecutive slots starts (besides 0).
        self.slots: list[int] = slots.tolist()
        self._slot_breaks: list[int] = (np.flatnonzero(np.diff(slots) != 1) + 1).tolist()
        self._pieces: dict[tuple[int, int, tuple[int, ...], int], Pieces] = {}
        self._missing = [(1 << (token_end - token_start)) - 1] * num_layers  # bit i: offset i not written yet
        self._remaining = num_layers * (token_end - token_start)
        self.sources: set[int] = set()  # ids of the connections that delivered data for it
        self.transports: set[str] = set()  # what that data came over (ReadPath.transport)
        self.route = 0  # the key of its route in the receiver's sink (0: none)
        self.future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        # A failure nobody waits for must not be logged as "exception never retrieved".
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def done(self) -> bool:
        return self.future.done()

    def local_range(self, token_start: int, num_tokens: int) -> tuple[int, int] | None:
        """Offsets [a, b) into this request's range for a header's tokens, or None if outside it."""
        a = token_start - self.token_start
        b = a + num_tokens
        if a < 0 or b > self.num_tokens or num_tokens <= 0:
            return None
        return a, b

    def pieces(self, a: int, b: int, token_bytes: int, source_blocks: tuple[int, ...] = (), offset: int = 0) -> Pieces:
        """Offsets [a, b) as pieces: source offset, slot offset, length, in bytes.

        The source is contiguous from the range's first token, or, given `source_blocks`, the
        sender's cache slots of positions `offset` onwards of those blocks (which must hold them).
        """
        key = (a, b, source_blocks, offset)
        pieces = self._pieces.get(key)
        if pieces is None:
            # Plain Python: a request's first header builds this on the critical path, where
            # numpy's per-call costs came to about 200 us in a Ray actor just woken up.
            n, bs = b - a, self.block_size
            breaks = {i - a for i in self._slot_breaks if a < i < b}
            if source_blocks:
                breaks.update(
                    j * bs - offset
                    for j in range(1, len(source_blocks))
                    if source_blocks[j] != source_blocks[j - 1] + 1 and 0 < j * bs - offset < n
                )
            starts = sorted(breaks)
            ends = [*starts, n]
            starts.insert(0, 0)
            rows = []
            for start, end in zip(starts, ends, strict=True):
                if source_blocks:
                    p = offset + start
                    source = source_blocks[p // bs] * bs + p % bs
                else:
                    source = start
                rows.append((source * token_bytes, self.slots[a + start] * token_bytes, (end - start) * token_bytes))
            pieces = self._pieces[key] = Pieces(np.array(rows, dtype=np.uint64).T)
        return pieces

    def mark(self, layer: int, a: int, b: int) -> None:
        """Record that layer `layer` of offsets [a, b) has been written; completes when all have."""
        bits = ((1 << (b - a)) - 1) << a
        missing = self._missing[layer]
        self._remaining -= (missing & bits).bit_count()
        self._missing[layer] = missing & ~bits
        if self._remaining == 0:
            self.complete(time.monotonic())

    def complete(self, at: float) -> None:
        """Every layer is in place since monotonic time `at`."""
        if not self.future.done():
            self.future.set_result(at)

    def fail(self, error: TransferError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
