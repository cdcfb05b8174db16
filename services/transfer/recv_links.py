"""The receiver's end of one connection: the handshake that accepts a sender, what its headers are read by, its acks.

    decode (Link.accept)                                  prefill (peers.py)
    check the fingerprint, connect back to the  ◄───  frame(HandshakeRequest)
    sender's worker, open the regions it shares
    (see recv_paths.py for how each is read)    ───►  frame(HandshakeReply: ok, whether it reads the ring and the cache)

Acks are what lets the sender reuse its memory, and nothing waits on them but the end of a
request; so they are sent when a request completes, or once ACK_BATCH of them are due, or
ACK_DELAY_S after the first one is due. Each ack wakes the sender's event loop, which on a busy
host competes for the GIL with the thread that submits the next layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from services.proto_gen import kv_pb2
from services.transfer import native, ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.expected import ExpectedRequest
from services.transfer.fingerprint import KVFingerprint
from services.transfer.handshake import hello_problem, peer_problem
from services.transfer.recv_paths import (
    SHM,
    BounceBuffer,
    InPlaceGet,
    ReadPath,
    open_region,
    region_path,
    ucx_transport,
)
from services.transfer.routes import Routes
from services.transfer.wire import FRAME_BYTES, decode_frame, encode_frame

log = logging.getLogger(__name__)
ACK_BATCH = 64
ACK_DELAY_S = 0.002


class PostedRead(NamedTuple):
    """A header whose gets are in flight (ReadPath.posts): tokens [a, b) of `layer`, and its ack once they land."""

    request: ExpectedRequest
    layer: int
    a: int
    b: int
    sequence: int


class Link:
    """One accepted connection (`conn` is its id): the control connection and the data-path connection back.

    `on_failure(conn, error)` is called when sending acks fails.
    """

    def __init__(
        self,
        conn: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_failure: Callable[[int, TransferError], None],
    ) -> None:
        self.conn = conn
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a sender"
        self.task = asyncio.current_task()
        self.data: native.Connection | None = None
        self.tag = 0
        # What reads a header's K and V: from the sender's shared KV cache (a header with source_blocks), from
        # tensors it registered in place (with keys), from its staging ring (the others); None if not shared.
        self.cache: ReadPath | None = None
        self.in_place: ReadPath | None = None
        self.ring: ReadPath | None = None
        self.transport = ""  # what its reads go over: SHM when it maps the sender's memory, else UCX's transports
        self.acks: list[int] = []  # due, not yet sent
        self.posted: list[PostedRead] = []  # gets in flight on `data`, waited for before the loop goes on
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._on_failure = on_failure

    async def accept(
        self,
        fp: KVFingerprint,
        config: TransferConfig,
        on_events: Callable[[int, list[tuple[int, int, bytes]]], bool],
        into_cuda: bool,
        bounce: BounceBuffer,
        routes: Routes | None,
        token: bytes,
    ) -> bool:
        """Check every field of the sender's handshake (handshake.py), then connect back to its worker; True when
        the link is up. A refused sender gets the reason in a HandshakeReply(ok=False), and a log line here."""
        frame = await asyncio.wait_for(self.reader.readexactly(FRAME_BYTES), config.timeout_s)
        try:
            hello = decode_frame(frame, kv_pb2.HandshakeRequest)
            refused = hello_problem(hello, token)
            if refused:
                raise ValueError(refused)
            fp.check(KVFingerprint.from_proto(hello.fingerprint))
            refused = peer_problem(hello, ucx_runtime.own_shape())
            if refused:
                raise ValueError(refused)
            node = ucx_runtime.node()
            self.tag = ucx_runtime.subscribe(lambda events: on_events(self.conn, events))
            self.data = node.connect(hello.worker_address, hello.tag, self.tag)
            self._open_paths(hello, config.timeout_s, into_cuda, bounce, routes)
            reply = kv_pb2.HandshakeReply(
                ok=True,
                worker_address=node.address,
                tag=self.tag,
                staging=self.ring is not None,
                cache=self.cache is not None,
            )
        except (KVIncompatible, ValueError, native.NativeError) as exc:
            reply = kv_pb2.HandshakeReply(ok=False, error=str(exc))
            log.warning("refused KV connection %d from %s: %s", self.conn, self.peer, exc)
        self.writer.write(encode_frame(reply))
        await asyncio.wait_for(self.writer.drain(), config.timeout_s)
        if reply.ok:
            self._log_transport()
        return bool(reply.ok)

    def _open_paths(
        self, hello: Any, timeout_s: float, into_cuda: bool, bounce: BounceBuffer, routes: Routes | None
    ) -> None:
        assert self.data is not None
        ucx = ucx_transport(self.data.transports())
        self.in_place = InPlaceGet(self.data, timeout_s, ucx)
        if hello.HasField("staging"):
            ring = open_region(self.conn, self.data, hello.staging, "staging ring", prefault=False)
            if ring is not None:
                self.ring = region_path(self.data, ring, False, into_cuda, timeout_s, bounce, ucx)
        if hello.HasField("cache"):
            cache = open_region(self.conn, self.data, hello.cache, "KV cache", prefault=True)
            if cache is not None:
                self.cache = region_path(self.data, cache, True, into_cuda, timeout_s, bounce, ucx)
                if cache.mapped and routes is not None:
                    routes.add_source(self.conn, self.tag, cache)
        mapped = any(path is not None and path.transport == SHM for path in (self.cache, self.ring))
        self.transport = SHM if mapped else ucx

    def _log_transport(self) -> None:
        """Say once per connection what its KV crosses (the transport a deployment's NICs gave it)."""
        assert self.data is not None
        if self.transport == SHM:
            how = "the sender's memory mapped here"
        else:
            devices = sorted({lane.device for lane in self.data.transports() if lane.transport != "self"})
            how = f"device {', '.join(devices)}"
        log.info("KV connection %d from %s: reads over %s (%s)", self.conn, self.peer, self.transport, how)

    def acks_due(self, now: bool) -> None:
        """Send the acks due: at once when `now` or ACK_BATCH of them are due, else ACK_DELAY_S after the first."""
        if now or len(self.acks) >= ACK_BATCH:
            self.send_acks()
        elif self.acks and self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self.send_acks)

    def send_acks(self, closing: bool = False) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if not (self.acks or closing) or self.data is None:
            return
        ack = kv_pb2.KVAck(sequences=self.acks, closing=closing)
        self.acks = []
        try:
            self.data.send(ack.SerializeToString())
        except native.NativeError as exc:
            if not closing:
                self._on_failure(
                    self.conn, TransferError("peer_gone", f"acknowledging on KV connection {self.conn}: {exc}")
                )

    def end(self, routes: Routes | None) -> None:
        """Say goodbye on the data path, then close both connections (its serving task then finishes)."""
        if not self.ended.done():
            self.ended.set_result(None)
        self.posted = []  # closing `data` ends their gets; their requests fail
        if self.tag and routes is not None:  # before its cache is unmapped
            self.acks.extend(routes.remove_source(self.tag))
        if self.tag:
            ucx_runtime.unsubscribe(self.tag)
        for path in (self.ring, self.cache):
            if path is not None and path.region is not None:
                path.region.key.close()
        self.ring = self.cache = None
        if self.data is not None:
            self.send_acks(closing=True)
            self.data.close(flush_timeout_s=0.1)
        self.writer.transport.abort()
