"""Memory as the data path sees it: regions known to UCX, a peer's regions, and the pieces to copy between them."""

from __future__ import annotations

import ctypes
import os

import numpy as np

from services.transfer.native.library import lib, sized


class Pieces:
    """Runs to copy or fetch, as rows of a [3, n] uint64 array: remote offset, local offset, length.

    Built once per token range and reused by every layer; it holds the row pointers C reads.
    """

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.ascontiguousarray(rows, dtype=np.uint64)
        if self.rows.ndim != 2 or self.rows.shape[0] != 3:
            raise ValueError(f"pieces must be [3, n] rows, got shape {self.rows.shape}")
        self.count = int(self.rows.shape[1])
        base = self.rows.ctypes.data
        self.pointers = (base, base + 8 * self.count, base + 16 * self.count)


class Region:
    """Memory known to UCX; `rkey` is what a peer needs to fetch from it."""

    def __init__(self, so: ctypes.CDLL, handle: int, address: int, length: int) -> None:
        self._lib = so
        self._h: int | None = handle
        self.address = address
        self.length = length
        self.rkey = sized(so.kvx_region_rkey, handle)

    def close(self) -> None:
        if self._h:
            h, self._h = self._h, None
            self._lib.kvx_unregister(h)


class RemoteKey:
    """An unpacked rkey of a peer's region; close it before its connection."""

    def __init__(self, so: ctypes.CDLL, handle: int) -> None:
        self._lib = so
        self.handle: int | None = handle

    def local_address(self, remote: int) -> int:
        """Where the peer's address is mapped in this process (shared memory), or 0."""
        return int(self._lib.kvx_rkey_ptr(self.handle, remote))

    def close(self) -> None:
        if self.handle:
            h, self.handle = self.handle, None
            self._lib.kvx_rkey_destroy(h)


def copy_kv(k_source: int, v_source: int, k_local: int, v_local: int, pieces: Pieces) -> None:
    """`Connection.fetch` of K and of V from memory mapped into this process (`RemoteKey.local_address`)."""
    lib().kvx_copy_kv(k_source, v_source, k_local, v_local, pieces.count, *pieces.pointers)


def prefault(address: int, length: int) -> None:
    """Map every page of memory mapped from a peer now, so that no copy takes a fault on first touch."""
    err = lib().kvx_prefault(address, length)
    if err:
        raise OSError(err, f"mapping {length} bytes of a peer's region: {os.strerror(err)}")


def shared_mapping(address: int, length: int) -> bool | None:
    """Whether all of [address, address + length) lies in one mapping of one shared object, within its size;
    None when `address` is in no shared object's mapping at all (private or anonymous memory)."""
    inside = lib().kvx_shared_mapping(address, length)
    return None if inside < 0 else bool(inside)


def pages_mapped(address: int, length: int) -> bool:
    """Whether every page of [address, address + length) is mapped in this process, by any mapping."""
    return bool(lib().kvx_pages_mapped(address, length))
