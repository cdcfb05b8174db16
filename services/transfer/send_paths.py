"""The sender's paths: where a KVHeader tells the decode side to read a layer's K and V from.

    path             the header names                            held until the ack
    SharedCachePath  blocks of the KV cache in shared memory     nothing (the caller holds the blocks)
    StagingPath      K then V, copied into the staging ring      the ring space
    InPlacePath      K and V where they lie, with their rkeys    the tensors and their registrations

The decode side reads what a header names by mapping the region when it can, else by RMA get
(recv_paths.py); the header is the same either way. Which path a send takes is KVSender's choice.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import weakref
from abc import ABC, abstractmethod
from typing import Any

import torch

from services.transfer import native
from services.transfer.errors import TransferError
from services.transfer.expected import slot_ids
from services.transfer.in_flight import Hold, Pending
from services.transfer.kv import KVBlocks, KVTensors, LayerKV
from services.transfer.staging import StagingRing

log = logging.getLogger(__name__)

# A send from the shared cache spans at most this many blocks (the header goes as an eager message).
MAX_SOURCE_BLOCKS = 256


class SendPath(ABC):
    """One way of offering a layer's K and V to a connection's receiver."""

    reserves = False  # whether K and V need space that `reserve` hands out (else `offer` gets space 0)

    def reserve(self, nbytes: int, timeout_s: float | None) -> int:
        """Space for the `nbytes` of K and V, waited for up to timeout_s (None: forever); `offer` then gets it.

        Raises TransferError("timeout") when there is none in time.
        """
        return 0

    @abstractmethod
    def offer(self, data: native.Connection, header: Any, kv: LayerKV, space: int, pending: Pending) -> None:
        """Point `header` (its sequence set, `pending` in flight under it) at K and V, and send it on `data`.

        Sets `pending.hold` to what must be held before the header goes. Raises NativeError when UCX
        fails; `pending.hold` is then the caller's to release.
        """


class SharedCachePath(SendPath):
    """The KV cache in shared memory that UCX allocated: [layers, 2, blocks, block_size, heads, dim].

    The decode side maps it once (or reads it by RMA get), so a send copies nothing here.
    """

    def __init__(self, region: native.Region, tensor: torch.Tensor) -> None:
        self.region = region
        self.tensor = tensor
        self.block_size = int(tensor.shape[3])
        self.num_blocks = int(tensor.shape[2])
        self.plane_bytes = region.length // (2 * int(tensor.shape[0]))  # one [layer, k/v] plane

    @classmethod
    def allocate(cls, node: native.Node, shape: tuple[int, ...], dtype: torch.dtype) -> SharedCachePath:
        """A zeroed cache of `shape`, every page mapped now; it lives as long as the tensor and its views."""
        nbytes = math.prod(shape) * dtype.itemsize
        region = node.allocate(nbytes)
        memory = (ctypes.c_uint8 * nbytes).from_address(region.address)
        finalizer = weakref.finalize(memory, region.close)
        finalizer.atexit = False  # at exit the process's memory goes anyway, UCX possibly first
        return cls(region, torch.frombuffer(memory, dtype=dtype).view(shape).zero_())

    def point(self, header: Any, kv: KVBlocks) -> None:
        """Point `header` at its tokens' blocks; ValueError unless they are at most MAX_SOURCE_BLOCKS of this cache."""
        token_start, bs = header.token_start, self.block_size
        first, last = token_start // bs, (token_start + kv.num_tokens - 1) // bs
        blocks = kv.block_table[first : last + 1]
        if len(blocks) < last - first + 1:
            raise ValueError(
                f"block_table has {len(kv.block_table)} blocks; tokens up to {token_start + kv.num_tokens} "
                f"need {last + 1}"
            )
        if len(blocks) > MAX_SOURCE_BLOCKS:
            raise ValueError(f"one send spans at most {MAX_SOURCE_BLOCKS} blocks, this one {len(blocks)}")
        if min(blocks) < 0 or max(blocks) >= self.num_blocks:
            raise ValueError(f"block ids must lie in [0, {self.num_blocks})")
        header.k_address = self.region.address + 2 * header.layer * self.plane_bytes
        header.v_address = header.k_address + self.plane_bytes
        header.source_blocks.extend(blocks)
        header.source_offset = token_start % bs

    def gather(self, layer: int, token_start: int, kv: KVBlocks) -> KVTensors:
        """The tokens copied out of the cache (for a receiver that cannot read it)."""
        slots = torch.from_numpy(slot_ids(kv.block_table, token_start, token_start + kv.num_tokens, self.block_size))
        planes = self.tensor[layer].flatten(1, 2)
        return KVTensors(planes[0][slots], planes[1][slots])

    def offer(self, data: native.Connection, header: Any, kv: LayerKV, space: int, pending: Pending) -> None:
        data.send(header.SerializeToString())  # the header points at the blocks already (`point`)


class _RingSpace(Hold):
    __slots__ = ("_ring", "_offset")

    def __init__(self, ring: StagingRing, offset: int) -> None:
        self._ring: StagingRing | None = ring
        self._offset = offset

    def release(self) -> None:
        if self._ring is not None:
            self._ring.give(self._offset)
            self._ring = None


class StagingPath(SendPath):
    """Host tensors copied into the staging ring (staging.py), shared memory that the decode side maps."""

    reserves = True

    def __init__(self, ring: StagingRing) -> None:
        self.ring: StagingRing | None = ring
        self.region = ring.region
        self._lock = threading.Lock()  # close() unmaps the ring only between two stagings

    @classmethod
    def allocate(cls, node: native.Node, staging_mib: int) -> StagingPath | None:
        """A ring of `staging_mib` MiB; None when UCX cannot allocate one (tensors then go in place)."""
        try:
            return cls(StagingRing(node.allocate(staging_mib << 20)))
        except native.NativeError as exc:
            log.warning("no staging ring (%s): KV tensors are registered in place", exc)
            return None

    def fits(self, kv: KVTensors, nbytes: int) -> bool:
        """Whether K and V (`nbytes` in all) go through the ring: host tensors of at most half of it."""
        ring = self.ring
        return ring is not None and nbytes <= ring.size // 2 and not kv.k.is_cuda

    def reserve(self, nbytes: int, timeout_s: float | None) -> int:
        ring = self.ring
        space = ring.take(nbytes, timeout_s) if ring is not None else None
        if space is None:
            raise TransferError("timeout", f"the staging ring stayed full for {timeout_s}s")
        return space

    def offer(self, data: native.Connection, header: Any, kv: LayerKV, space: int, pending: Pending) -> None:
        assert isinstance(kv, KVTensors)
        half = int(header.payload_bytes) // 2  # K's bytes, then V's
        k, v = kv.k.contiguous(), kv.v.contiguous()
        with self._lock:
            ring = self.ring
            if ring is None:
                raise native.NativeError("staging KV failed: the sender is closed", native.UCS_ERR_NOT_CONNECTED)
            header.k_address = ring.region.address + space
            header.v_address = header.k_address + half
            pending.hold = _RingSpace(ring, space)
            data.send_staged(header.k_address, k.data_ptr(), v.data_ptr(), half, header.SerializeToString())

    def close(self) -> None:
        with self._lock:
            if self.ring is not None:
                self.ring.region.close()
                self.ring = None


class _Registered(Hold):
    __slots__ = ("tensors", "regions")

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors  # held alive while registered
        self.regions: list[native.Region] = []

    def release(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()


class InPlacePath(SendPath):
    """K and V registered where they lie (CUDA tensors, or no usable ring); the decode side gets them by RMA."""

    def __init__(self, node: native.Node) -> None:
        self._node = node

    def offer(self, data: native.Connection, header: Any, kv: LayerKV, space: int, pending: Pending) -> None:
        assert isinstance(kv, KVTensors)
        k, v = kv.k.contiguous(), kv.v.contiguous()
        if k.is_cuda:
            torch.cuda.current_stream(k.device).synchronize()  # UCX reads outside torch's streams
        hold = pending.hold = _Registered((k, v))
        for t in (k, v):
            hold.regions.append(self._node.register(t.data_ptr(), t.numel() * t.element_size()))
        header.k_address, header.v_address = k.data_ptr(), v.data_ptr()
        header.k_rkey, header.v_rkey = hold.regions[0].rkey, hold.regions[1].rkey
        data.send(header.SerializeToString())
