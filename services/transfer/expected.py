"""The decode side's plan for one incoming request: which slots its tokens go to, what has arrived.

    token positions     token_start                         token_end
                             │◄──────── expected range ────────►│
    a header's range           [hdr.token_start, +num_tokens)   must lie inside it
    slot of position p:  block_ids[p // block_size] * block_size + p % block_size

A header's tokens are fetched as pieces, one per run of consecutive slots (a block, or several
blocks that happen to be adjacent): `pieces()` lists them once per distinct range, which every
layer then reuses.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from services.transfer.errors import TransferError


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
        ids = torch.as_tensor(block_ids, dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            raise ValueError(f"request {request_id!r}: block ids must lie in [0, {num_blocks})")
        pos = torch.arange(token_start, token_end, dtype=torch.int64)
        self.request_id = request_id
        self.token_start = token_start
        self.token_end = token_end
        self.slots = (ids[pos // block_size] * block_size + pos % block_size).numpy()
        self._pieces: dict[tuple[int, int], np.ndarray] = {}
        self._missing = np.ones((num_layers, token_end - token_start), dtype=bool)
        self._remaining = int(self._missing.size)
        self.sources: set[int] = set()  # ids of the connections that delivered data for it
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
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

    def pieces(self, a: int, b: int, token_bytes: int) -> np.ndarray:
        """Offsets [a, b) as [3, runs] uint64 rows: source offset, slot offset, length (bytes)."""
        key = (a, b)
        if key not in self._pieces:
            slots = self.slots[a:b]
            breaks = np.flatnonzero(np.diff(slots) != 1) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [b - a]))
            rows = np.stack([starts, slots[starts], ends - starts]) * token_bytes
            self._pieces[key] = np.ascontiguousarray(rows, dtype=np.uint64)
        return self._pieces[key]

    def mark(self, layer: int, a: int, b: int) -> None:
        """Record that layer `layer` of offsets [a, b) has been written; completes when all have."""
        row = self._missing[layer, a:b]
        self._remaining -= int(row.sum())
        row[:] = False
        if self._remaining == 0 and not self.future.done():
            self.future.set_result(None)

    def fail(self, error: TransferError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
