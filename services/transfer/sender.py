"""Prefill side of the KV hand-off: offers each layer's K and V to a decode worker, which fetches them.

    prefill (KVSender)                                    decode (KVReceiver)
    K, V where the peer reads them; KVHeader(seq) ───►  copy K, V straight into the request's blocks
    release K, V; the send's future resolves      ◄───  KVAck(seq)

A send is tensors or blocks of the KV cache in shared memory (kv.py), offered on one of three
paths (send_paths.py): blocks as they lie, host tensors copied into the staging ring, or tensors
registered in place. A peer that cannot read the cache gets those tokens gathered into tensors.
Headers and acks are short messages on the data path (native/); peers.py opens the connections.

A compute thread calls `submit` (thread-safe: it stages or registers and posts in the calling
thread, so layer N's transfer runs while layer N+1 computes); coroutines call `send`. K and V are
held until the ack, or, once a send has failed or timed out, another `timeout_s` (the peer might
still be reading them); blocks of the shared cache are the caller's to hold for that long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

import torch

from services.proto_gen import kv_pb2
from services.transfer import native, ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.fingerprint import KVFingerprint
from services.transfer.in_flight import InFlight, Pending
from services.transfer.kv import MAX_HEADER_BYTES, Headers, KVBlocks, KVTensors, LayerKV
from services.transfer.peers import PeerLink, PeerLinks, parse_peer
from services.transfer.send_paths import MAX_SOURCE_BLOCKS, InPlacePath, SendPath, SharedCachePath, StagingPath
from services.transfer.wire import parse

__all__ = ["MAX_HEADER_BYTES", "MAX_SOURCE_BLOCKS", "KVBlocks", "KVSender", "KVTensors", "parse_peer"]

log = logging.getLogger(__name__)


def _failed(exc: BaseException) -> concurrent.futures.Future[int]:
    """A send's future that failed before anything went out."""
    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(exc)
    return failed


class KVSender:
    """Offers KV layers to KVReceivers; one reused connection per peer."""

    def __init__(self, fingerprint: KVFingerprint, config: TransferConfig) -> None:
        self._fp = fingerprint
        self._headers = Headers(fingerprint)
        self._config = config
        self._links = PeerLinks(fingerprint, config, self._on_events, self._drop)
        self._in_flight = InFlight(config.timeout_s, self._overdue)
        self._staging: StagingPath | None = None
        self._cache: SharedCachePath | None = None
        self._in_place: InPlacePath | None = None
        self._node: native.Node | None = None  # once started
        self._closed = False

    async def send(self, peer: str, request_id: str, layer: int, token_start: int, kv: LayerKV) -> int:
        """Send tokens [token_start, token_start + n) of one layer; returns the payload bytes once the peer has them.

        `kv` is K and V as tensors, or n tokens in blocks of the shared cache (`allocate_cache`),
        which must keep their contents until this returns, or, when it raises, for another
        timeout_s; at most MAX_SOURCE_BLOCKS blocks per call. Raises ValueError for bad arguments,
        KVIncompatible when the decode side refuses the layout, TransferError("timeout") past
        timeout_s and TransferError("peer_gone") when the peer is unreachable or fails (the
        connection is then dropped, so a later send reconnects).
        """
        if self._closed:
            raise RuntimeError("KVSender is closed")
        header = self._header(request_id, layer, token_start, kv)
        parse_peer(peer)
        conn = await self._connection(peer)
        if isinstance(kv, KVBlocks) and not conn.cached:
            assert self._cache is not None
            kv = self._cache.gather(layer, token_start, kv)
            header = self._header(request_id, layer, token_start, kv)
        nbytes = int(header.payload_bytes)
        path = self._path(conn, kv, nbytes)
        try:
            space = path.reserve(nbytes, 0) if path.reserves else 0
        except TransferError:  # the ring is full: wait for acks without blocking the loop
            timeout = self._config.timeout_s
            space = await asyncio.get_running_loop().run_in_executor(None, path.reserve, nbytes, timeout)
        return await asyncio.wrap_future(self._offer(conn, header, path, kv, space))

    def submit(
        self, loop: asyncio.AbstractEventLoop, peer: str, request_id: str, layer: int, token_start: int, kv: LayerKV
    ) -> concurrent.futures.Future[int]:
        """`send` for a thread other than `loop`'s: offers at once when connected, else via the loop."""
        conn = self._links.by_peer.get(peer)
        if conn is None or self._closed or (isinstance(kv, KVBlocks) and not conn.cached):
            return asyncio.run_coroutine_threadsafe(self.send(peer, request_id, layer, token_start, kv), loop)
        try:
            header = self._header(request_id, layer, token_start, kv)
            nbytes = int(header.payload_bytes)
            path = self._path(conn, kv, nbytes)
            space = path.reserve(nbytes, self._config.timeout_s) if path.reserves else 0
        except (ValueError, TransferError) as exc:
            return _failed(exc)
        return self._offer(conn, header, path, kv, space)

    def allocate_cache(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """A zeroed host KV cache that decode workers read straight from; None when UCX cannot allocate it.

        `shape` is [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], as the
        fingerprint says. Sends from it (`KVBlocks`) need no staging copy: on one host the decode
        side maps this memory, elsewhere it fetches by RMA get. Call after `start()` and before
        the first connection (the handshake describes the cache). The memory lives as long as
        the tensor and its views.
        """
        fp = self._fp
        expected = (fp.num_layers, 2, shape[2] if len(shape) == 6 else -1, fp.block_size, fp.num_kv_heads, fp.head_dim)
        if tuple(shape) != expected or shape[2] < 1:
            raise ValueError(f"a KV cache for this fingerprint has shape {expected} with num_blocks >= 1, got {shape}")
        if self._node is None or self._links.by_peer or self._cache is not None:
            raise RuntimeError("allocate_cache comes once, after start() and before the first connection")
        try:
            self._cache = SharedCachePath.allocate(self._node, tuple(shape), fp.torch_dtype)
        except native.NativeError as exc:
            log.warning("no shared KV cache (%s): sends from the cache are staged", exc)
            return None
        return self._cache.tensor

    async def start(self) -> None:
        """Bring UCX and the staging ring up now; otherwise the first connection does."""
        if self._closed:
            raise RuntimeError("KVSender is closed")
        if self._node is None:
            self._node = node = ucx_runtime.acquire(self._config)
            self._in_flight.start(asyncio.get_running_loop())
            self._in_place = InPlacePath(node)
            self._staging = StagingPath.allocate(node, self._config.staging_mib) if self._config.staging_mib else None

    async def close(self) -> None:
        """Close every connection (the receivers see them end)."""
        if self._closed:
            return
        self._closed = True
        self._in_flight.close()
        conns = list(self._links.by_peer.values())
        for conn in conns:
            self._drop(conn, TransferError("cancelled", "the KV sender closed"))
        # Let the aborted control connections' reads end while the loop still runs.
        watches = [c.watch for c in conns if c.watch is not None]
        if watches:
            await asyncio.wait(watches, timeout=1.0)
        self._in_flight.release_retired()
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._node is not None:
            self._node = None
            ucx_runtime.release()

    @property
    def peers(self) -> list[str]:
        return list(self._links.by_peer)

    @property
    def connects(self) -> int:
        """Connections opened so far (reuse means this stays at one per peer)."""
        return self._links.connects

    # ---- one send ---------------------------------------------------------------------------

    def _header(self, request_id: str, layer: int, token_start: int, kv: LayerKV) -> Any:
        """The send's KVHeader, its sequence (and for tensors their addresses) still to fill in; ValueError if bad.

        This and `_offer` run once per layer sent, in the prefill's compute thread: they make few calls.
        """
        if isinstance(kv, KVBlocks):
            if self._cache is None:
                raise ValueError("no shared KV cache: allocate_cache() first (or it could not be allocated)")
            header = self._headers.new(request_id, layer, token_start, kv)
            self._cache.point(header, kv)
            return header
        return self._headers.new(request_id, layer, token_start, kv)

    def _path(self, conn: PeerLink, kv: LayerKV, nbytes: int) -> SendPath:
        """Blocks go from the cache (the caller saw that this peer reads it); tensors are staged if they can be."""
        if isinstance(kv, KVBlocks):
            assert self._cache is not None
            return self._cache
        staging = self._staging  # close() may set it to None meanwhile
        if conn.staged and staging is not None and staging.fits(kv, nbytes):
            return staging
        assert self._in_place is not None
        return self._in_place

    def _offer(
        self, conn: PeerLink, header: Any, path: SendPath, kv: LayerKV, space: int
    ) -> concurrent.futures.Future[int]:
        """Offer K and V on `path`, in flight from just before the header goes (its ack may come at once)."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        pending = Pending(future, conn, int(header.payload_bytes), time.monotonic() + self._config.timeout_s)
        in_flight = self._in_flight.pending
        header.sequence = sequence = next(self._in_flight.sequences)
        in_flight[sequence] = pending
        try:
            path.offer(conn.data, header, kv, space, pending)
        except BaseException as exc:
            in_flight.pop(sequence, None)
            pending.hold.release()
            if not isinstance(exc, native.NativeError):
                raise
            if not future.done():  # else its connection was dropped meanwhile, failing it already
                future.set_exception(TransferError("peer_gone", f"sending to {conn.peer} failed: {exc}"))
            return future
        self._in_flight.sweep_soon()
        return future

    def _on_events(self, conn: PeerLink, events: list[tuple[int, int, bytes]]) -> None:
        for kind, status, payload in events:
            if kind == native.EVENT_PEER_FAILED:
                self._drop(conn, TransferError("peer_gone", f"{conn.peer}: {native.status_string(status)}"))
                return
            try:
                ack = parse(payload, kv_pb2.KVAck)
            except ValueError as exc:
                self._drop(conn, TransferError("bad_header", f"bad ack from {conn.peer}: {exc}"))
                return
            self._in_flight.acked(conn, ack.sequences)
            if ack.closing:
                self._drop(conn, TransferError("peer_gone", f"the decode worker at {conn.peer} closed the connection"))
                return

    def _overdue(self, conn: PeerLink) -> None:
        if conn.peer in self._links.by_peer:
            message = f"{conn.peer} did not take the KV within {self._config.timeout_s}s"
            self._drop(conn, TransferError("timeout", message))

    # ---- connections ------------------------------------------------------------------------

    async def _connection(self, peer: str) -> PeerLink:
        link = self._links.by_peer.get(peer)
        if link is None:
            await self.start()
            staging = self._staging.region if self._staging is not None else None
            link = await self._links.get(peer, staging, self._cache.region if self._cache else None)
        return link

    def _drop(self, conn: PeerLink, error: TransferError) -> None:
        """Forget the connection; its sends fail with `error`, their memory is held another timeout_s."""
        self._links.close(conn)
        self._in_flight.fail(conn, error, time.monotonic())
        if self._in_flight.retired:
            self._in_flight.sweep_soon()
