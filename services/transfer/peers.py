"""The sender's connections, one per decode worker: opened by the handshake on first use, watched until they end.

    prefill (PeerLinks.open)                        decode (KVReceiver)
    TCP connection to host:port; frame(HandshakeRequest: layout, worker address, tag,
                                      the staging ring and shared cache it may read)  ───►
                                                     ◄───  frame(HandshakeReply: ok, worker address, tag,
                                                                 whether it reads the ring and the cache)
    data-path connection to its worker (native/); the control connection stays open and carries nothing more

Headers and acks then travel on the data path. The control connection's end means the hand-off
connection ended, and so does a failure the data path reports (`on_events` gets those). To a peer
that reads this side's memory over tcp (another host without RDMA), each get is a message this
side's worker answers; such a connection keeps the worker awake for a while after each header
(`answers_gets`), which made requests of 4 and 64 MiB about a quarter faster between test hosts
(services/bench/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.proto_gen import kv_pb2
from services.transfer import native, ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.fingerprint import KVFingerprint
from services.transfer.handshake import HANDSHAKE_PROTOCOL, load_token, peer_problem
from services.transfer.wire import keep_alive, request, until_closed


@dataclass(eq=False)
class PeerLink:
    peer: str
    reader: asyncio.StreamReader  # the control connection (wire.py): read until it ends
    control: asyncio.StreamWriter
    data: native.Connection
    tag: int
    staged: bool  # the receiver reads the staging ring (else tensors are registered in place)
    cached: bool  # the receiver reads the shared KV cache (else what is sent from it is gathered)
    watch: asyncio.Task[None] | None = None


# Transports without RMA of their own: UCX emulates the peer's gets with messages this side answers.
EMULATED_RMA = frozenset({"tcp", "ud_verbs", "ud_mlx5"})


def answers_gets(lanes: list[native.Lane]) -> bool:
    """Whether a peer on these lanes reads this side's memory through gets that this side's worker must answer
    (another host, over tcp; not with RDMA, whose NIC answers them, nor on one host, which maps or uses cma)."""
    names = {lane.transport for lane in lanes if lane.transport != "self"}
    return bool(names) and names <= EMULATED_RMA


def parse_peer(peer: str) -> tuple[str, int]:
    """Split "host:port"; ValueError with the offending text otherwise."""
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"peer must be 'host:port', got {peer!r}")
    return host, int(port)


def _shared_region(region: native.Region) -> Any:
    return kv_pb2.SharedRegion(rkey=region.rkey, address=region.address, bytes=region.length)


class PeerLinks:
    """Open connections by peer; `on_events` gets each one's data-path events, `on_end` its end."""

    def __init__(
        self,
        fingerprint: KVFingerprint,
        config: TransferConfig,
        on_events: Callable[[PeerLink, list[tuple[int, int, bytes]]], None],
        on_end: Callable[[PeerLink, TransferError], None],
    ) -> None:
        self._fp = fingerprint
        self._config = config
        self._token = load_token(config)
        self._on_events = on_events
        self._on_end = on_end
        self.by_peer: dict[str, PeerLink] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self.connects = 0  # connections opened so far (reuse means this stays at one per peer)

    async def get(self, peer: str, staging: native.Region | None, cache: native.Region | None) -> PeerLink:
        """The connection to `peer`, opened now if there is none (offering the regions it may read)."""
        link = self.by_peer.get(peer)
        if link is not None:
            return link
        host, port = parse_peer(peer)
        lock = self._connecting.setdefault(peer, asyncio.Lock())
        async with lock:
            link = self.by_peer.get(peer)
            if link is not None:
                return link
            timeout = self._config.timeout_s
            try:
                link = await asyncio.wait_for(self._open(peer, host, port, staging, cache), timeout)
            except TimeoutError:
                raise TransferError("timeout", f"connecting to {peer} took over {timeout}s") from None
            self.by_peer[peer] = link
            link.watch = asyncio.ensure_future(self._watch(link))
            self.connects += 1
            return link

    def close(self, link: PeerLink) -> None:
        """Forget the connection and close both of its ends."""
        if self.by_peer.get(link.peer) is link:
            del self.by_peer[link.peer]
        ucx_runtime.unsubscribe(link.tag)
        link.control.transport.abort()  # which also ends the watch's read
        link.data.close()

    async def _open(
        self, peer: str, host: str, port: int, staging: native.Region | None, cache: native.Region | None
    ) -> PeerLink:
        try:
            reader, control = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise TransferError("peer_gone", f"cannot connect to KV receiver at {peer}: {exc!r}") from exc
        keep_alive(control)
        box: list[PeerLink] = []
        tag = ucx_runtime.subscribe(lambda events: self._on_events(box[0], events) if box else None)
        try:
            node = ucx_runtime.node()
            hello = kv_pb2.HandshakeRequest(
                fingerprint=self._fp.to_proto(),
                worker_address=node.address,
                tag=tag,
                protocol=HANDSHAKE_PROTOCOL,
                token=self._token,
            )
            if staging is not None:
                hello.staging.CopyFrom(_shared_region(staging))
            if cache is not None:
                hello.cache.CopyFrom(_shared_region(cache))
            reply = await request(reader, control, hello, kv_pb2.HandshakeReply)
            if not reply.ok:
                raise KVIncompatible(f"decode worker at {peer} refused the KV hand-off: {reply.error}")
            refused = peer_problem(reply, ucx_runtime.own_shape())
            if refused:
                raise ValueError(refused)
            data = node.connect(reply.worker_address, reply.tag, tag)
            if answers_gets(data.transports()):
                data.answer_gets()
            staged, cached = reply.staging and staging is not None, reply.cache and cache is not None
            box.append(PeerLink(peer, reader, control, data, tag, staged, cached))
            return box[0]
        except BaseException as exc:
            ucx_runtime.unsubscribe(tag)
            control.transport.abort()
            if isinstance(exc, (KVIncompatible, asyncio.CancelledError)):
                raise
            if isinstance(exc, ValueError):
                raise TransferError("bad_header", f"bad handshake reply from {peer}: {exc}") from exc
            raise TransferError("peer_gone", f"handshake with {peer} failed: {exc!r}") from exc

    async def _watch(self, link: PeerLink) -> None:
        """The control connection carries nothing after the handshake: anything on it means it ended."""
        reason = await until_closed(link.reader)
        if self.by_peer.get(link.peer) is link:
            self._on_end(link, TransferError("peer_gone", f"connection to {link.peer} ended: {reason}"))
