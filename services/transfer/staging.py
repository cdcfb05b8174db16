"""Reusable byte buffers for packing (sender) KV messages, so steady-state sends allocate nothing.

A fresh large allocation is an mmap whose pages fault in on first touch (for a 4 MiB message that
costs about as much as the copy itself), so buffers are recycled once UCX has finished with them.
Sizes are rounded up to a power of two (at least 64 KiB) and pooled per size.
"""

from __future__ import annotations

import torch

MIN_BUFFER_BYTES = 64 << 10


class StagingPool:
    """Free lists of uint8 buffers on one device, keyed by power-of-two size."""

    def __init__(self, device: torch.device, max_free_per_size: int = 16) -> None:
        if max_free_per_size < 0:
            raise ValueError(f"max_free_per_size must be >= 0, got {max_free_per_size}")
        self.device = device
        self._max_free = max_free_per_size
        self._free: dict[int, list[torch.Tensor]] = {}
        self.allocations = 0  # buffers created so far (stays flat once the pool is warm)

    @staticmethod
    def bucket(nbytes: int) -> int:
        if nbytes <= 0:
            raise ValueError(f"buffer size must be > 0, got {nbytes}")
        return max(MIN_BUFFER_BYTES, 1 << (nbytes - 1).bit_length())

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least `nbytes` bytes (contents undefined); hand it back with `give`."""
        size = self.bucket(nbytes)
        free = self._free.get(size)
        if free:
            return free.pop()
        self.allocations += 1
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer from `take` once nothing (UCX included) reads or writes it any more."""
        free = self._free.setdefault(int(buf.numel()), [])
        if len(free) < self._max_free:
            free.append(buf)
