"""The receiver's paths: how the K and V that a KVHeader names reach the KV cache.

    the header names                      this side                          path
    the sender's shared cache or ring     maps it (same host), host cache    MappedCopy: copies out of the mapping
    the sender's shared cache             cannot map it (another host)       RemoteGet: RMA gets straight into place
    the sender's ring                     cannot map it, host cache          BouncedGet: one get, then copies
    either, into a CUDA cache             -                                  RemoteGet (UCX copies host to device)
    tensors registered in place (keys)    -                                  InPlaceGet: RMA gets, with the keys

Each path names what its bytes cross (`transport`): "shm" for MappedCopy, else the UCX transports of
the connection's lanes (`ucx_transport`), such as "tcp" to another host or "cma" on this one.
Every path copies only the pieces it is given: runs of slots consecutive on both sides
(expected.py), into the planes of one layer. All of it happens synchronously, so once `read`
returns the KV is in place and nothing is left in flight; but for RemoteGet, which only posts its
gets (`posts`), so that the gets of every header that came in one wake-up are in flight together:
the receiver waits for them (`Connection.wait`) before it goes back to its event loop. Over tcp
each get is a round trip to the sender's worker, and one header's pair of gets at a time left the
link idle most of the time (services/bench/README.md).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.transfer import native
from services.transfer.fingerprint import KVFingerprint
from services.transfer.ucx_formats import rkey_problem

log = logging.getLogger(__name__)
SHM = "shm"  # the transport of a path that copies out of a mapping of the sender's memory
MAX_HEADER_BYTES = 1 << 16  # a serialised KVHeader: the longest request id plus MAX_HEADER_BLOCKS fit easily
MAX_HEADER_BLOCKS = 4096  # source blocks of one header (the sender sends at most MAX_SOURCE_BLOCKS)


def ucx_transport(lanes: list[native.Lane]) -> str:
    """What RMA gets on a connection with these lanes go over: the transports but "self", sorted, joined by "+".

    UCX picks the lanes once per endpoint, out of UCX_TLS and what the peer can be reached by: "tcp"
    to another host without RDMA, "rc_mlx5" (and more) with it, "cma" and shared memory on one host.
    """
    names = sorted({lane.transport for lane in lanes if lane.transport != "self"})
    return "+".join(names) or ("self" if lanes else "unknown")


def joined(transports: set[str]) -> str:
    """Several transports as one name: every part of each, sorted and joined by "+" ("" for none)."""
    return "+".join(sorted({part for t in transports for part in t.split("+") if part}))


@dataclass
class SharedRegion:
    """A region of the sender's memory that this side reads: its staging ring or its KV cache."""

    key: native.RemoteKey
    address: int  # in the sender's address space
    length: int
    mapped: int  # where it is mapped here (0: not mapped, fetch by RMA get)

    def holds(self, address: int, length: int) -> bool:
        return self.address <= address and address + length <= self.address + self.length


def peer_memory_mapped(local: int, remote: int, length: int) -> bool:
    """Whether `length` bytes of a peer's, at `remote` there and mapped by UCX at `local` here, can be copied from.

    A peer's memory must be one shared object's, to the end the peer claims. Mapped pages alone prove
    nothing: whatever the kernel placed next to the object is mapped too. Only this process's own private
    memory (UCX's self transport maps it at its own address), which is no shared object, need merely be mapped.
    """
    inside = native.shared_mapping(local, length)
    if inside is None and local == remote:
        return native.pages_mapped(local, length)
    return bool(inside)


def open_region(conn: int, data: native.Connection, region: Any, what: str, prefault: bool) -> SharedRegion | None:
    """Unpack a SharedRegion message of the sender's (mapping it when on this host); None if unreachable.

    The first touch of each page of a mapping costs a fault, which requests read from random blocks
    of the sender's KV cache would pay for a long while: `prefault` maps all of it now instead (see
    services/bench/README.md for both costs). The staging ring needs none of that: it is reused
    from its start, so its first pages are warm after one request.
    """
    try:
        key = data.unpack(region.rkey)
    except native.NativeError as exc:
        log.warning("KV connection %d: cannot reach the sender's %s (%s)", conn, what, exc)
        return None
    shared = SharedRegion(key, region.address, region.bytes, key.local_address(region.address))
    if shared.mapped and not peer_memory_mapped(shared.mapped, region.address, shared.length):
        # Copies (ours, or UCX's shared-memory gets) would run off the end of what the sender really shares.
        log.warning("KV connection %d: the sender's %s is smaller than the %d bytes it claims", conn, what,
                    region.bytes)
        key.close()
        return None
    if shared.mapped and prefault:
        try:
            native.prefault(shared.mapped, shared.length)
        except OSError as exc:  # only slower: pages then map on first touch
            log.warning("KV connection %d: %s", conn, exc)
    return shared


class ReadPath(ABC):
    """One way of reading what headers of one kind name (one connection's cache, ring or registered tensors)."""

    region: SharedRegion | None = None  # what it reads, for the headers that name addresses in it
    transport: str  # what its bytes cross (see the module docstring)
    posts = False  # `read` only starts the copy: the connection's `wait` ends it

    @abstractmethod
    def read(self, hdr: Any, pieces: native.Pieces, k_plane: int, v_plane: int) -> None:
        """Copy the header's K and V into the layer's planes at `pieces` (or, where `posts`, start to).

        Raises NativeError when UCX fails (status UCS_ERR_TIMED_OUT past the config's timeout_s).
        """


class MappedCopy(ReadPath):
    """A region mapped into this process (same host) into a host cache: copies, no syscall per piece."""

    def __init__(self, region: SharedRegion) -> None:
        self.region = region
        self.transport = SHM

    def read(self, hdr: Any, pieces: native.Pieces, k_plane: int, v_plane: int) -> None:
        assert self.region is not None
        offset = self.region.mapped - self.region.address
        native.copy_kv(offset + hdr.k_address, offset + hdr.v_address, k_plane, v_plane, pieces)


class RemoteGet(ReadPath):
    """RMA gets straight into place: a cache this process cannot map, or any region into a CUDA cache.

    It posts the gets and returns; the connection's `wait` waits for them.
    """

    posts = True

    def __init__(self, data: native.Connection, region: SharedRegion, transport: str) -> None:
        self.region = region
        self.transport = transport
        self._data = data

    def read(self, hdr: Any, pieces: native.Pieces, k_plane: int, v_plane: int) -> None:
        assert self.region is not None
        self._data.post(self.region.key, hdr.k_address, k_plane, pieces)
        self._data.post(self.region.key, hdr.v_address, v_plane, pieces)


class BounceBuffer:
    """Host memory that BouncedGet reads a header's K and V into; one per receiver, grown as needed."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def address(self, nbytes: int) -> int:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return int(self._buffer.data_ptr())


class BouncedGet(ReadPath):
    """A ring this process cannot map, into a host cache: one get of K and V into a bounce buffer, then copies.

    K and V are contiguous in the ring, so one get takes both, where gets into place would be one
    per piece.
    """

    def __init__(
        self, data: native.Connection, region: SharedRegion, timeout_s: float, bounce: BounceBuffer, transport: str
    ) -> None:
        self.region = region
        self.transport = transport
        self._data = data
        self._timeout_s = timeout_s
        self._bounce = bounce

    def read(self, hdr: Any, pieces: native.Pieces, k_plane: int, v_plane: int) -> None:
        assert self.region is not None
        half = int(hdr.payload_bytes) // 2
        bounce = self._bounce.address(2 * half)
        whole = native.Pieces(np.array([[0], [0], [2 * half]]))
        self._data.fetch(self.region.key, hdr.k_address, bounce, whole, self._timeout_s)
        native.copy_kv(bounce, bounce + half, k_plane, v_plane, pieces)


class InPlaceGet(ReadPath):
    """Tensors the sender registered in place (CUDA, or no ring): the header carries their keys, one get each."""

    def __init__(self, data: native.Connection, timeout_s: float, transport: str) -> None:
        self.transport = transport
        self._data = data
        self._timeout_s = timeout_s

    def read(self, hdr: Any, pieces: native.Pieces, k_plane: int, v_plane: int) -> None:
        half = int(hdr.payload_bytes) // 2
        for rkey, address, plane in ((hdr.k_rkey, hdr.k_address, k_plane), (hdr.v_rkey, hdr.v_address, v_plane)):
            key = self._data.unpack(rkey)
            try:
                local = key.local_address(address)  # shared memory: UCX's get copies from this mapping
                if local and not peer_memory_mapped(local, address, half):
                    raise native.NativeError("the sender's tensor is not all in the memory its key shares",
                                             native.UCS_ERR_INVALID_ADDR)
                self._data.fetch(key, address, plane, pieces, self._timeout_s)
            finally:
                key.close()


def region_path(
    data: native.Connection,
    region: SharedRegion,
    cache: bool,
    on_cuda: bool,
    timeout_s: float,
    bounce: BounceBuffer,
    transport: str,
) -> ReadPath:
    """The path for the sender's shared cache (`cache`) or its ring, into a host or CUDA KV cache.

    `transport`: what gets on `data` go over (`ucx_transport`).
    """
    if region.mapped and not on_cuda:
        return MappedCopy(region)
    if on_cuda or cache:
        return RemoteGet(data, region, transport)
    return BouncedGet(data, region, timeout_s, bounce, transport)


def header_problem(hdr: Any, fp: KVFingerprint, token_bytes: int, cache: ReadPath | None, ring: ReadPath | None) -> str:
    """Why a header cannot be trusted, or "" (`cache` and `ring` read the sender's regions, if any).

    Every number is checked against the layout and the regions before it is used as an address or a size;
    keys are walked before UCX unpacks them (ucx_formats.rkey_problem).
    """
    if hdr.layer >= fp.num_layers:
        return f"header layer {hdr.layer} out of range (num_layers={fp.num_layers})"
    if hdr.num_tokens == 0:
        return "header with num_tokens=0"
    half = hdr.num_tokens * token_bytes
    if hdr.payload_bytes != 2 * half:
        return (
            f"header payload_bytes={hdr.payload_bytes} but {hdr.num_tokens} tokens of this layout take {2 * half} bytes"
        )
    if bool(hdr.k_rkey) != bool(hdr.v_rkey) or not hdr.k_address or not hdr.v_address:
        return "header without the addresses of its K and V, or with only one key"
    for rkey in (hdr.k_rkey, hdr.v_rkey) if hdr.k_rkey else ():
        problem = rkey_problem(rkey)
        if problem:
            return f"header with a bad key: {problem}"
    if len(hdr.source_blocks) > MAX_HEADER_BLOCKS:
        return f"header naming {len(hdr.source_blocks)} cache blocks, more than {MAX_HEADER_BLOCKS}"
    if hdr.source_blocks:  # in the shared KV cache: every block named must lie inside it
        blocks = hdr.source_blocks
        if hdr.k_rkey or len(blocks) * fp.block_size < hdr.source_offset + hdr.num_tokens:
            return "header with cache blocks that do not hold its tokens, or with keys as well"
        plane = (max(blocks) + 1) * fp.block_size * token_bytes
        region = cache.region if cache is not None else None
        if region is None or not (region.holds(hdr.k_address, plane) and region.holds(hdr.v_address, plane)):
            return "header points outside the sender's shared KV cache"
    elif not hdr.k_rkey:  # in the staging ring: it must lie inside it
        region = ring.region if ring is not None else None
        if region is None or not region.holds(hdr.k_address, 2 * half) or hdr.v_address != hdr.k_address + half:
            return "header points outside the sender's staging ring"
    return ""
