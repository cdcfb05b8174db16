"""The sender's staging ring: shared memory that UCX allocates, which host KV is copied into.

On one host the decode side maps this memory (ucp_rkey_ptr) and copies straight from it into its
blocks: one user-space copy on each side, no syscall per piece, which beats RMA gets of the same
pieces out of the prefill's own tensors (services/bench/README.md has the figures).

Space is handed out in allocation order, around a ring; `give` may come in any order (acks from
several decode workers), and space is reused once everything allocated before it is given back.
`take` waits while the ring is full, so a prefill that outruns its decode workers slows down
instead of growing without bound.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict

import torch

from services.transfer.native import Region

ALIGN = 64


class StagingRing:
    def __init__(self, region: Region) -> None:
        self.region = region
        self.size = region.length
        self.buffer = torch.frombuffer((ctypes.c_uint8 * self.size).from_address(region.address), dtype=torch.uint8)
        self._cond = threading.Condition(threading.Lock())
        self._live: OrderedDict[int, list[int]] = OrderedDict()  # offset -> [size, given back]
        self._head = 0  # offset of the oldest live allocation
        self._tail = 0  # where the next allocation starts (or wraps to 0)

    def take(self, nbytes: int, timeout_s: float | None) -> int | None:
        """Offset of `nbytes` of ring space; waits up to timeout_s (None: forever) and gives None."""
        if not 0 < nbytes <= self.size // 2:
            raise ValueError(f"{nbytes} bytes do not fit a staging ring of {self.size}")
        size = -(-nbytes // ALIGN) * ALIGN
        with self._cond:
            offset = self._fits(size)
            if offset is None:
                if not self._cond.wait_for(lambda: self._fits(size) is not None, timeout_s):
                    return None
                offset = self._fits(size)
                assert offset is not None
            self._live[offset] = [size, 0]
            self._tail = offset + size
            return offset

    def give(self, offset: int) -> None:
        with self._cond:
            self._live[offset][1] = 1
            while self._live and next(iter(self._live.values()))[1]:
                self._live.popitem(last=False)
            if self._live:
                self._head = next(iter(self._live))
            else:
                self._head = self._tail = 0
            self._cond.notify_all()

    def _fits(self, size: int) -> int | None:
        if not self._live:
            return 0
        if self._head < self._tail:
            if self._tail + size <= self.size:
                return self._tail
            return 0 if size <= self._head else None
        return self._tail if self._tail + size <= self._head else None

    @property
    def used(self) -> int:
        with self._cond:
            return sum(size for size, _ in self._live.values())
