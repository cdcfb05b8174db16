"""Prefill side of the KV hand-off: offers each layer's K and V to a decode worker, which fetches them.

    prefill (KVSender)                                 decode (KVReceiver)
    stage (or register) K, V; KVHeader(seq, where) ───►  copy K, V straight into the
                                                          request's blocks
    release K, V; the send's future resolves   ◄───────  KVAck(seq)

The fastest way is from a KV cache that lives in shared memory (`allocate_cache`, which a
prefill worker on CPU uses as its engine's cache): a header names the blocks a layer's tokens
are in (`send_cached`), the decode side maps the whole cache once and copies out of those
blocks, and nothing is copied here. Host tensors are first copied into the staging ring
(staging.py), shared memory that the decode side maps and copies from in the same way; CUDA
tensors (and every tensor when staging_mib is 0, or a part too big for the ring) are
registered in place and fetched by RMA get. Either way the decode side writes into its KV
cache only what it asked for, and a cancelled request simply fetches no more. Headers and acks
are short messages on the data-path worker (native/); the ucxx endpoint that carried the
handshake stays open as the control connection whose failure tells this side the peer is gone.

A compute thread calls `submit` or `submit_cached` (thread-safe; they stage or register and post
in the calling thread, so layer N's transfer runs while layer N+1 computes); coroutines call
`send` or `send_cached`. K and V are held until the ack, a failure, or, once a send has failed
or timed out, for another `timeout_s` (the peer might still be reading them); blocks of the
shared cache are the caller's to hold for that long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import itertools
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from services.proto_gen import kv_pb2
from services.transfer import native, ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.expected import slot_ids
from services.transfer.fingerprint import KVFingerprint
from services.transfer.staging import StagingRing
from services.transfer.wire import decode_frame, encode_frame, new_frame_buffer, parse

log = logging.getLogger(__name__)

# Headers go as eager messages; a request id long enough to break that is refused, and so is a
# send from the shared cache that spans more blocks than this.
MAX_HEADER_BYTES = 4096
MAX_SOURCE_BLOCKS = 256


@dataclass
class _Connection:
    peer: str
    ep: Any  # ucxx control endpoint
    data: native.Connection
    tag: int
    staged: bool  # the receiver reads the staging ring (else tensors are registered in place)
    cached: bool  # the receiver reads the shared KV cache (else what is sent from it is staged)
    watch: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Pending:
    future: concurrent.futures.Future[int]
    conn: _Connection
    regions: list[native.Region]
    tensors: tuple[torch.Tensor, ...]  # registered in place: held until released
    payload_bytes: int
    deadline: float
    ring: StagingRing | None = None
    offset: int = 0  # of K then V in the ring, when staged

    def release(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()
        if self.ring is not None:
            self.ring.give(self.offset)
            self.ring = None


@dataclass
class _SharedCache:
    """The KV cache in shared memory (`KVSender.allocate_cache`): [layers, 2, blocks, block_size, heads, dim]."""

    region: native.Region
    tensor: torch.Tensor
    plane_bytes: int  # one [layer, k/v] plane

    @property
    def num_blocks(self) -> int:
        return int(self.tensor.shape[2])


def _failed(exc: BaseException) -> concurrent.futures.Future[int]:
    """A send's future that failed before anything went out."""
    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(exc)
    return failed


def _shared_region(region: native.Region) -> Any:
    return kv_pb2.SharedRegion(rkey=region.rkey, address=region.address, bytes=region.length)


def parse_peer(peer: str) -> tuple[str, int]:
    """Split "host:port"; ValueError with the offending text otherwise."""
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"peer must be 'host:port', got {peer!r}")
    return host, int(port)


class KVSender:
    """Offers KV layers to KVReceivers; one reused connection per peer."""

    def __init__(self, fingerprint: KVFingerprint, config: TransferConfig) -> None:
        self._fp = fingerprint
        self._token_shape = (fingerprint.num_kv_heads, fingerprint.head_dim)
        self._dtype = fingerprint.torch_dtype
        self._token_payload = fingerprint.payload_bytes(1)
        self._config = config
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._pending: dict[int, _Pending] = {}
        self._retired: list[tuple[float, _Pending]] = []  # failed sends whose memory is held a while
        self._sequence = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeping = False
        self._ring: StagingRing | None = None
        self._ring_lock = threading.Lock()  # close() unmaps the ring only between two stagings
        self._cache: _SharedCache | None = None
        self._ucxx: Any = None
        self._closed = False
        self.connects = 0  # connections opened so far (reuse means this stays at one per peer)

    async def send(
        self, peer: str, request_id: str, layer: int, token_start: int, k: torch.Tensor, v: torch.Tensor
    ) -> int:
        """Send K and V (each [n, num_kv_heads, head_dim]) of tokens [token_start, token_start+n) of one layer.

        Returns the payload bytes once the decode side has them. Raises ValueError for bad
        arguments, KVIncompatible when the decode side refuses the layout, TransferError("timeout")
        past timeout_s and TransferError("peer_gone") when the peer is unreachable or fails (the
        connection is then dropped, so a later send reconnects).
        """
        if self._closed:
            raise RuntimeError("KVSender is closed")
        header = self._tensor_header(request_id, layer, token_start, k, v)
        parse_peer(peer)
        conn = await self._connection(peer)
        offset = None
        nbytes = self._staged_bytes(conn, k)
        if nbytes:
            offset = self._ring.take(nbytes, 0) if self._ring else None
            if offset is None:  # the ring is full: wait for acks without blocking the loop
                offset = await asyncio.get_running_loop().run_in_executor(None, self._take, nbytes)
        return await asyncio.wrap_future(self._offer(conn, header, k, v, offset))

    def submit(
        self,
        loop: asyncio.AbstractEventLoop,
        peer: str,
        request_id: str,
        layer: int,
        token_start: int,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> concurrent.futures.Future[int]:
        """`send` for a thread other than `loop`'s: offers at once when connected, else via the loop."""
        conn = self._conns.get(peer)
        if conn is None or self._closed:
            return asyncio.run_coroutine_threadsafe(self.send(peer, request_id, layer, token_start, k, v), loop)
        try:
            header = self._tensor_header(request_id, layer, token_start, k, v)
            nbytes = self._staged_bytes(conn, k)
            offset = self._take(nbytes) if nbytes else None
        except (ValueError, TransferError) as exc:
            return _failed(exc)
        return self._offer(conn, header, k, v, offset)

    async def send_cached(
        self, peer: str, request_id: str, layer: int, token_start: int, num_tokens: int, block_table: list[int]
    ) -> int:
        """`send` of K and V of tokens [token_start, token_start+num_tokens) of one layer, from the shared cache.

        `block_table` lists the request's blocks in the cache of `allocate_cache`, from position 0.
        The decode side copies straight out of those blocks, so they must keep their contents until
        this returns, or, when it raises, for another timeout_s. At most MAX_SOURCE_BLOCKS blocks
        per call. A decode side that cannot read the cache gets the tokens staged instead.
        """
        if self._closed:
            raise RuntimeError("KVSender is closed")
        header = self._cached_header(request_id, layer, token_start, num_tokens, block_table)
        parse_peer(peer)
        conn = await self._connection(peer)
        if not conn.cached:
            k, v = self._gather(header, block_table)
            return await self.send(peer, request_id, layer, token_start, k, v)
        return await asyncio.wrap_future(self._offer(conn, header, None, None, None))

    def submit_cached(
        self,
        loop: asyncio.AbstractEventLoop,
        peer: str,
        request_id: str,
        layer: int,
        token_start: int,
        num_tokens: int,
        block_table: list[int],
    ) -> concurrent.futures.Future[int]:
        """`send_cached` for a thread other than `loop`'s: offers at once when connected, else via the loop."""
        conn = self._conns.get(peer)
        if conn is None or not conn.cached or self._closed:
            coro = self.send_cached(peer, request_id, layer, token_start, num_tokens, block_table)
            return asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            header = self._cached_header(request_id, layer, token_start, num_tokens, block_table)
        except ValueError as exc:
            return _failed(exc)
        return self._offer(conn, header, None, None, None)

    def allocate_cache(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """A zeroed host KV cache that decode workers read straight from; None when UCX cannot allocate it.

        `shape` is [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], as the
        fingerprint says. Sends from it (`send_cached`) need no staging copy: on one host the
        decode side maps this memory, elsewhere it fetches by RMA get. Call after `start()` and
        before the first connection (the handshake describes the cache). The memory lives as
        long as the tensor and its views.
        """
        fp = self._fp
        expected = (fp.num_layers, 2, shape[2] if len(shape) == 6 else -1, fp.block_size, *self._token_shape)
        if tuple(shape) != expected or shape[2] < 1:
            raise ValueError(f"a KV cache for this fingerprint has shape {expected} with num_blocks >= 1, got {shape}")
        if self._ucxx is None or self._conns or self._cache is not None:
            raise RuntimeError("allocate_cache comes once, after start() and before the first connection")
        nbytes = math.prod(shape) * self._dtype.itemsize
        try:
            region = ucx_runtime.node().allocate(nbytes)
        except native.NativeError as exc:
            log.warning("no shared KV cache (%s): sends from the cache are staged", exc)
            return None
        memory = (ctypes.c_uint8 * nbytes).from_address(region.address)
        finalizer = weakref.finalize(memory, region.close)
        finalizer.atexit = False  # at exit the process's memory goes anyway, UCX possibly first
        tensor = torch.frombuffer(memory, dtype=self._dtype).view(shape).zero_()  # maps every page now
        self._cache = _SharedCache(region, tensor, nbytes // (2 * fp.num_layers))
        return tensor

    async def start(self) -> None:
        """Bring UCX and the staging ring up now; otherwise the first connection does."""
        if self._closed:
            raise RuntimeError("KVSender is closed")
        if self._ucxx is None:
            self._ucxx = ucx_runtime.acquire(self._config)
            self._loop = asyncio.get_running_loop()
            self._ring = self._new_ring()

    async def close(self) -> None:
        """Close every connection (the receivers see them end)."""
        if self._closed:
            return
        self._closed = True
        conns = list(self._conns.values())
        for conn in conns:
            self._drop(conn, TransferError("cancelled", "the KV sender closed"))
        # Let the aborted control endpoints' receives end while the loop still runs.
        watches = [c.watch for c in conns if c.watch is not None]
        if watches:
            await asyncio.wait(watches, timeout=1.0)
        for _, pending in self._retired:
            pending.release()
        self._retired.clear()
        with self._ring_lock:
            if self._ring is not None:
                self._ring.region.close()
                self._ring = None
        if self._ucxx is not None:
            self._ucxx = None
            ucx_runtime.release()

    @property
    def peers(self) -> list[str]:
        return list(self._conns)

    # ---- internals --------------------------------------------------------------------------

    def _header(self, request_id: str, layer: int, token_start: int, num_tokens: int) -> Any:
        """A KVHeader of `num_tokens` tokens, addresses and sequence still to fill in; ValueError for bad arguments."""
        fp = self._fp
        if not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not 0 <= layer < fp.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {fp.num_layers})")
        if token_start < 0:
            raise ValueError(f"token_start must be >= 0, got {token_start}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if len(request_id) > MAX_HEADER_BYTES // 8 and len(request_id.encode()) > MAX_HEADER_BYTES // 2:
            raise ValueError(f"request_id is too long ({len(request_id)} chars) for a KV header")
        return kv_pb2.KVHeader(
            request_id=request_id,
            layer=layer,
            token_start=token_start,
            num_tokens=num_tokens,
            payload_bytes=num_tokens * self._token_payload,
        )

    def _tensor_header(self, request_id: str, layer: int, token_start: int, k: torch.Tensor, v: torch.Tensor) -> Any:
        """`_header` for K and V given as tensors, which it checks too."""
        fp = self._fp
        shape = k.shape
        for name, t in (("k", k), ("v", v)):
            if len(t.shape) != 3 or t.shape[1:] != self._token_shape or t.shape[0] == 0:
                raise ValueError(
                    f"{name} must have shape [n>0, {fp.num_kv_heads}, {fp.head_dim}], got {tuple(t.shape)}"
                )
            if t.dtype != self._dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, the fingerprint says {self._dtype}")
        if v.shape != shape:
            raise ValueError(f"k {tuple(shape)} and v {tuple(v.shape)} differ in shape")
        return self._header(request_id, layer, token_start, shape[0])

    def _cached_header(
        self, request_id: str, layer: int, token_start: int, num_tokens: int, block_table: list[int]
    ) -> Any:
        """The KVHeader of a send from the shared cache, its sequence still to fill in; ValueError for bad arguments."""
        cache = self._cache
        if cache is None:
            raise ValueError("no shared KV cache: allocate_cache() first (or it could not be allocated)")
        header = self._header(request_id, layer, token_start, num_tokens)
        bs = self._fp.block_size
        first, last = token_start // bs, (token_start + num_tokens - 1) // bs
        blocks = block_table[first : last + 1]
        if len(blocks) < last - first + 1:
            raise ValueError(
                f"block_table has {len(block_table)} blocks; tokens up to {token_start + num_tokens} need {last + 1}"
            )
        if len(blocks) > MAX_SOURCE_BLOCKS:
            raise ValueError(f"one send spans at most {MAX_SOURCE_BLOCKS} blocks, this one {len(blocks)}")
        if any(not 0 <= b < cache.num_blocks for b in blocks):
            raise ValueError(f"block ids must lie in [0, {cache.num_blocks})")
        header.k_address = cache.region.address + 2 * layer * cache.plane_bytes
        header.v_address = header.k_address + cache.plane_bytes
        header.source_blocks.extend(blocks)
        header.source_offset = token_start % bs
        return header

    def _gather(self, header: Any, block_table: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V that a cached header names, copied out of the cache (for a peer that cannot read it)."""
        assert self._cache is not None
        start, n = int(header.token_start), int(header.num_tokens)
        slots = torch.from_numpy(slot_ids(block_table, start, start + n, self._fp.block_size))
        planes = self._cache.tensor[header.layer].flatten(1, 2)
        return planes[0][slots], planes[1][slots]

    def _staged_bytes(self, conn: _Connection, k: torch.Tensor) -> int:
        """Ring space K and V need, or 0 when they go in place (CUDA, no usable ring, too big)."""
        ring = self._ring
        if not conn.staged or ring is None or k.is_cuda:
            return 0
        nbytes = 2 * k.numel() * k.element_size()
        return nbytes if nbytes <= ring.size // 2 else 0

    def _take(self, nbytes: int) -> int:
        assert self._ring is not None
        offset = self._ring.take(nbytes, self._config.timeout_s)
        if offset is None:
            raise TransferError("timeout", f"the staging ring stayed full for {self._config.timeout_s}s")
        return offset

    def _offer(
        self, conn: _Connection, header: Any, k: torch.Tensor | None, v: torch.Tensor | None, offset: int | None
    ) -> concurrent.futures.Future[int]:
        """Stage (at `offset` of the ring) or register K and V, announce them; the ack resolves the future.

        Without K and V, the header points into the shared cache already.
        """
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        pending = _Pending(future, conn, [], (), int(header.payload_bytes), time.monotonic() + self._config.timeout_s)
        sequence = next(self._sequence)
        try:
            if k is None or v is None:
                header.sequence = sequence
                self._pending[sequence] = pending
                conn.data.send(header.SerializeToString())
            elif offset is not None:
                half = k.numel() * k.element_size()
                k, v = k.contiguous(), v.contiguous()
                with self._ring_lock:
                    ring = pending.ring = self._ring
                    if ring is None:
                        raise native.NativeError(
                            "staging KV failed: the sender is closed", native.UCS_ERR_NOT_CONNECTED
                        )
                    pending.offset = offset
                    header.k_address = ring.region.address + offset
                    header.v_address = header.k_address + half
                    header.sequence = sequence
                    self._pending[sequence] = pending
                    conn.data.send_staged(
                        header.k_address, k.data_ptr(), v.data_ptr(), half, header.SerializeToString()
                    )
            else:
                k, v = pending.tensors = (k.contiguous(), v.contiguous())
                if k.is_cuda:
                    torch.cuda.current_stream(k.device).synchronize()  # UCX reads outside torch's streams
                node = ucx_runtime.node()
                for t in (k, v):
                    pending.regions.append(node.register(t.data_ptr(), t.numel() * t.element_size()))
                header.k_address, header.v_address = k.data_ptr(), v.data_ptr()
                header.k_rkey, header.v_rkey = pending.regions[0].rkey, pending.regions[1].rkey
                header.sequence = sequence
                self._pending[sequence] = pending
                conn.data.send(header.SerializeToString())
        except native.NativeError as exc:
            self._pending.pop(sequence, None)
            pending.release()
            future.set_exception(TransferError("peer_gone", f"sending to {conn.peer} failed: {exc}"))
            return future
        self._start_sweeper()
        return future

    def _on_events(self, conn: _Connection, events: list[tuple[int, int, bytes]]) -> None:
        for kind, status, payload in events:
            if kind == native.EVENT_PEER_FAILED:
                self._drop(conn, TransferError("peer_gone", f"{conn.peer}: {native.status_string(status)}"))
                return
            try:
                ack = parse(payload, kv_pb2.KVAck)
            except ValueError as exc:
                self._drop(conn, TransferError("bad_header", f"bad ack from {conn.peer}: {exc}"))
                return
            for sequence in ack.sequences:
                pending = self._pending.get(sequence)
                if pending is not None and pending.conn is conn:
                    del self._pending[sequence]
                    pending.release()
                    if not pending.future.done():
                        pending.future.set_result(pending.payload_bytes)
            if ack.closing:
                self._drop(conn, TransferError("peer_gone", f"the decode worker at {conn.peer} closed the connection"))
                return

    def _start_sweeper(self) -> None:
        if not self._sweeping and self._loop is not None:
            self._sweeping = True
            self._loop.call_soon_threadsafe(self._sweep)

    def _sweep(self) -> None:
        """Fail sends past their deadline (dropping their connection) and free retired memory."""
        now = time.monotonic()
        for pending in list(self._pending.values()):
            if pending.deadline < now and pending.conn.peer in self._conns:
                self._drop(
                    pending.conn,
                    TransferError(
                        "timeout", f"{pending.conn.peer} did not take the KV within {self._config.timeout_s}s"
                    ),
                )
        keep = []
        for until, pending in self._retired:
            if until < now:
                pending.release()
            else:
                keep.append((until, pending))
        self._retired = keep
        self._sweeping = False
        if (self._pending or self._retired) and not self._closed:
            assert self._loop is not None
            self._sweeping = True
            self._loop.call_later(min(1.0, self._config.timeout_s / 4), self._sweep)

    async def _connection(self, peer: str) -> _Connection:
        conn = self._conns.get(peer)
        if conn is not None:
            return conn
        host, port = parse_peer(peer)
        lock = self._connecting.setdefault(peer, asyncio.Lock())
        async with lock:
            conn = self._conns.get(peer)
            if conn is not None:
                return conn
            await self.start()
            try:
                conn = await asyncio.wait_for(self._connect(peer, host, port), self._config.timeout_s)
            except TimeoutError:
                raise TransferError("timeout", f"connecting to {peer} took over {self._config.timeout_s}s") from None
            self._conns[peer] = conn
            conn.watch = asyncio.ensure_future(self._watch(conn))
            self.connects += 1
            return conn

    def _new_ring(self) -> StagingRing | None:
        if not self._config.staging_mib:
            return None
        try:
            return StagingRing(ucx_runtime.node().allocate(self._config.staging_mib << 20))
        except native.NativeError as exc:
            log.warning("no staging ring (%s): KV tensors are registered in place", exc)
            return None

    async def _connect(self, peer: str, host: str, port: int) -> _Connection:
        from services.transfer.ucx_ops import post_recv, post_send

        try:
            ep = await self._ucxx.create_endpoint(host, port, connect_timeout=self._config.timeout_s)
        except Exception as exc:
            raise TransferError("peer_gone", f"cannot connect to KV receiver at {peer}: {exc!r}") from exc
        box: list[_Connection] = []
        tag = ucx_runtime.subscribe(lambda events: self._on_events(box[0], events) if box else None)
        try:
            node = ucx_runtime.node()
            hello = kv_pb2.HandshakeRequest(fingerprint=self._fp.to_proto(), worker_address=node.address, tag=tag)
            if self._ring is not None:
                hello.staging.CopyFrom(_shared_region(self._ring.region))
            if self._cache is not None:
                hello.cache.CopyFrom(_shared_region(self._cache.region))
            reply_frame = new_frame_buffer()
            await post_send(ep, encode_frame(hello))
            await post_recv(ep, reply_frame)
            reply = decode_frame(reply_frame, kv_pb2.HandshakeReply)
            if not reply.ok:
                raise KVIncompatible(f"decode worker at {peer} refused the KV hand-off: {reply.error}")
            data = node.connect(reply.worker_address, reply.tag, tag)
            staged, cached = reply.staging and self._ring is not None, reply.cache and self._cache is not None
            box.append(_Connection(peer, ep, data, tag, staged, cached))
            return box[0]
        except BaseException as exc:
            ucx_runtime.unsubscribe(tag)
            ep.abort()
            if isinstance(exc, (KVIncompatible, asyncio.CancelledError)):
                raise
            if isinstance(exc, ValueError):
                raise TransferError("bad_header", f"bad handshake reply from {peer}: {exc}") from exc
            raise TransferError("peer_gone", f"handshake with {peer} failed: {exc!r}") from exc

    async def _watch(self, conn: _Connection) -> None:
        """The control endpoint carries nothing after the handshake: any completion means it ended."""
        from services.transfer.ucx_ops import post_recv

        try:
            await post_recv(conn.ep, new_frame_buffer())
            reason = "sent on the control endpoint"
        except asyncio.CancelledError:
            return
        except Exception as exc:
            reason = repr(exc)
        if self._conns.get(conn.peer) is conn:
            self._drop(conn, TransferError("peer_gone", f"connection to {conn.peer} ended: {reason}"))

    def _drop(self, conn: _Connection, error: TransferError) -> None:
        """Forget the connection; its sends fail with `error`, their memory is held another timeout_s."""
        if self._conns.get(conn.peer) is conn:
            del self._conns[conn.peer]
        ucx_runtime.unsubscribe(conn.tag)
        conn.ep.abort()  # which also ends the watch's receive
        conn.data.close()
        until = time.monotonic() + self._config.timeout_s
        for sequence, pending in list(self._pending.items()):
            if pending.conn is conn:
                del self._pending[sequence]
                self._retired.append((until, pending))
                if not pending.future.done():
                    pending.future.set_exception(error)
        if self._retired:
            self._start_sweeper()
