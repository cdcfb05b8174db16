"""Prefill side of the KV hand-off: streams each layer's K and V to a decode worker's KVReceiver.

Use from the event loop that owns the sender. A prefill worker that computes in another thread
overlaps transfer and compute by submitting one coroutine per layer and moving on:

    fut = asyncio.run_coroutine_threadsafe(sender.send(peer, rid, layer, start, k, v), loop)

A send validates, then copies its header, K and V into the connection's open message (outbox.py;
a layer whose payload exceeds wire.MAX_PAYLOAD_BYTES is split into several token ranges) and
waits on that message's future. Messages are self-contained, so sends need no lock and may
interleave. Packing costs a memcpy, but it is what lets the receiver pre-post its receives (no
header → payload round trip through Python) and lets queued layers share one UCX message. `k`
and `v` must not be modified until that layer's future is done (they are copied when the
coroutine first runs, which the submitting thread cannot observe).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import torch

from services.proto_gen import kv_pb2
from services.transfer import ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.fingerprint import KVFingerprint
from services.transfer.outbox import Outbox
from services.transfer.staging import StagingPool
from services.transfer.wire import MAX_FRAME_BODY, MAX_PAYLOAD_BYTES, decode_frame, encode_frame, new_frame_buffer

log = logging.getLogger(__name__)


@dataclass
class _Connection:
    peer: str
    ep: Any
    outbox: Outbox


def parse_peer(peer: str) -> tuple[str, int]:
    """Split "host:port"; ValueError with the offending text otherwise."""
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"peer must be 'host:port', got {peer!r}")
    return host, int(port)


class KVSender:
    """Sends KV layers to KVReceivers; one reused UCX endpoint per peer."""

    def __init__(self, fingerprint: KVFingerprint, config: TransferConfig) -> None:
        self._fp = fingerprint
        self._config = config
        self._tokens_per_message = MAX_PAYLOAD_BYTES // fingerprint.payload_bytes(1)
        if self._tokens_per_message == 0:
            raise ValueError(
                f"one token of one layer takes {fingerprint.payload_bytes(1)} bytes, more than the "
                f"{MAX_PAYLOAD_BYTES} a KV message carries"
            )
        self._pools: dict[torch.device, StagingPool] = {}
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._ucxx: Any = None
        self._closed = False
        self.connects = 0  # endpoints opened so far (reuse means this stays at one per peer)

    async def send(
        self, peer: str, request_id: str, layer: int, token_start: int, k: torch.Tensor, v: torch.Tensor
    ) -> int:
        """Send K and V (each [n, num_kv_heads, head_dim]) of tokens [token_start, token_start+n) of one layer.

        Returns the payload bytes sent. Raises ValueError for bad arguments, KVIncompatible when the
        decode side refuses the layout, TransferError("timeout") when an operation exceeds
        timeout_s and TransferError("peer_gone") when the peer is unreachable or fails (the endpoint
        is then dropped, so a later send reconnects).
        """
        if self._closed:
            raise RuntimeError("KVSender is closed")
        header = self._header(request_id, layer, token_start, k, v)
        parse_peer(peer)
        k, v = k.contiguous(), v.contiguous()
        conn = await self._connection(peer)
        try:
            done = [conn.outbox.add(part, k[lo:hi], v[lo:hi]) for part, lo, hi in self._parts(header)]
            pending = done[0] if len(done) == 1 else asyncio.gather(*done)
            await asyncio.wait_for(asyncio.shield(pending), self._config.timeout_s)
        except TimeoutError:
            self._drop(conn)
            raise TransferError(
                "timeout", f"sending layer {layer} of {request_id!r} to {peer} took over {self._config.timeout_s}s"
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._drop(conn)
            raise TransferError("peer_gone", f"sending to {peer} failed: {exc!r}") from exc
        return int(header.payload_bytes)

    async def close(self) -> None:
        """Close every endpoint (the receivers see the connections end)."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._ucxx is not None:
            self._ucxx = None
            ucx_runtime.release()

    @property
    def peers(self) -> list[str]:
        return list(self._conns)

    # ---- internals --------------------------------------------------------------------------

    def _header(self, request_id: str, layer: int, token_start: int, k: torch.Tensor, v: torch.Tensor) -> Any:
        fp = self._fp
        if not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not 0 <= layer < fp.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {fp.num_layers})")
        if token_start < 0:
            raise ValueError(f"token_start must be >= 0, got {token_start}")
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 3 or tuple(t.shape[1:]) != (fp.num_kv_heads, fp.head_dim) or t.shape[0] == 0:
                raise ValueError(
                    f"{name} must have shape [n>0, {fp.num_kv_heads}, {fp.head_dim}], got {tuple(t.shape)}"
                )
            if t.dtype != fp.torch_dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, the fingerprint says {fp.torch_dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
        n = int(k.shape[0])
        header = kv_pb2.KVHeader(
            request_id=request_id,
            layer=layer,
            token_start=token_start,
            num_tokens=n,
            payload_bytes=fp.payload_bytes(n),
        )
        if header.ByteSize() > MAX_FRAME_BODY:
            raise ValueError(f"request_id is too long ({len(request_id)} chars) for a KV header")
        return header

    def _pool(self, device: torch.device) -> StagingPool:
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools[device] = StagingPool(device)
        return pool

    def _parts(self, header: Any) -> list[tuple[Any, int, int]]:
        """(header, lo, hi) per message-sized token range of a layer; usually just the one."""
        n = int(header.num_tokens)
        step = self._tokens_per_message
        if n <= step:
            return [(header, 0, n)]
        return [(self._sub_header(header, lo, min(n, lo + step)), lo, min(n, lo + step)) for lo in range(0, n, step)]

    def _sub_header(self, header: Any, lo: int, hi: int) -> Any:
        return kv_pb2.KVHeader(
            request_id=header.request_id,
            layer=header.layer,
            token_start=header.token_start + lo,
            num_tokens=hi - lo,
            payload_bytes=self._fp.payload_bytes(hi - lo),
        )

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
            if self._ucxx is None:
                self._ucxx = ucx_runtime.acquire(self._config)
            try:
                ep = await asyncio.wait_for(self._connect(host, port), self._config.timeout_s)
            except TimeoutError:
                raise TransferError(
                    "timeout", f"connecting to {peer} took over {self._config.timeout_s}s"
                ) from None
            conn = _Connection(peer, ep, Outbox(ep, self._pool))
            self._conns[peer] = conn
            self.connects += 1
            return conn

    async def _connect(self, host: str, port: int) -> Any:

        from services.transfer.ucx_ops import post_recv, post_send

        peer = f"{host}:{port}"
        try:
            ep = await self._ucxx.create_endpoint(host, port, connect_timeout=self._config.timeout_s)
        except Exception as exc:
            raise TransferError("peer_gone", f"cannot connect to KV receiver at {peer}: {exc!r}") from exc
        try:
            reply_frame = new_frame_buffer()
            await post_send(ep, encode_frame(self._fp.to_proto()))
            await post_recv(ep, reply_frame)
            reply = decode_frame(reply_frame, kv_pb2.HandshakeReply)
        except ValueError as exc:
            ep.abort()
            raise TransferError("bad_header", f"bad handshake reply from {peer}: {exc}") from exc
        except Exception as exc:
            ep.abort()
            raise TransferError("peer_gone", f"handshake with {peer} failed: {exc!r}") from exc
        if not reply.ok:
            ep.abort()
            raise KVIncompatible(f"decode worker at {peer} refused the KV hand-off: {reply.error}")
        return ep

    def _drop(self, conn: _Connection) -> None:
        if self._conns.get(conn.peer) is conn:
            del self._conns[conn.peer]
        conn.ep.abort()
