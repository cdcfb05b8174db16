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
from collections.abc import Callable
from typing import Any

from services.proto_gen import kv_pb2
from services.transfer import native, ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.fingerprint import KVFingerprint
from services.transfer.recv_paths import BounceBuffer, InPlaceGet, ReadPath, open_region, region_path
from services.transfer.routes import Routes
from services.transfer.wire import decode_frame, encode_frame, new_frame_buffer

ACK_BATCH = 64
ACK_DELAY_S = 0.002


class Link:
    """One accepted connection (`conn` is its id): the ucxx control endpoint and the data-path connection back.

    `on_failure(conn, error)` is called when sending acks fails.
    """

    def __init__(self, conn: int, ep: Any, on_failure: Callable[[int, TransferError], None]) -> None:
        self.conn = conn
        self.ep = ep
        self.task = asyncio.current_task()
        self.data: native.Connection | None = None
        self.tag = 0
        # What reads a header's K and V: from the sender's shared KV cache (a header with source_blocks), from
        # tensors it registered in place (with keys), from its staging ring (the others); None if not shared.
        self.cache: ReadPath | None = None
        self.in_place: ReadPath | None = None
        self.ring: ReadPath | None = None
        self.acks: list[int] = []  # due, not yet sent
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
    ) -> bool:
        """Check the sender's fingerprint and connect back to its worker; True when the link is up."""
        from services.transfer.ucx_ops import post_recv, post_send

        frame = new_frame_buffer()
        await asyncio.wait_for(post_recv(self.ep, frame), config.timeout_s)
        try:
            hello = decode_frame(frame, kv_pb2.HandshakeRequest)
            fp.check(KVFingerprint.from_proto(hello.fingerprint))
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
        await asyncio.wait_for(post_send(self.ep, encode_frame(reply)), config.timeout_s)
        if not reply.ok:
            # Leave the sender time to read the refusal before the endpoint goes away.
            await asyncio.sleep(0.05)
        return bool(reply.ok)

    def _open_paths(
        self, hello: Any, timeout_s: float, into_cuda: bool, bounce: BounceBuffer, routes: Routes | None
    ) -> None:
        assert self.data is not None
        self.in_place = InPlaceGet(self.data, timeout_s)
        if hello.HasField("staging"):
            ring = open_region(self.conn, self.data, hello.staging, "staging ring", prefault=False)
            if ring is not None:
                self.ring = region_path(self.data, ring, False, into_cuda, timeout_s, bounce)
        if hello.HasField("cache"):
            cache = open_region(self.conn, self.data, hello.cache, "KV cache", prefault=True)
            if cache is not None:
                self.cache = region_path(self.data, cache, True, into_cuda, timeout_s, bounce)
                if cache.mapped and routes is not None:
                    routes.add_source(self.conn, self.tag, cache)

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
        """Say goodbye on the data path, then close both endpoints (its serving task then finishes)."""
        if not self.ended.done():
            self.ended.set_result(None)
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
        self.ep.abort()
