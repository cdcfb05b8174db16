"""A rogue peer on the KV channel, over real UCX on loopback: refused cleanly, and the receiver keeps serving.

Each rogue handshake goes to a real KVReceiver over its real control connection (TCP). Before these
checks, a worker address with an unknown version aborted the whole process inside UCX, so a
regression here kills the test run rather than failing one test.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf.message import Message

from services.bench.transfer_actors import make_kv
from services.proto_gen import kv_pb2
from services.transfer import (
    KVFingerprint,
    KVIncompatible,
    KVReceiver,
    KVSender,
    KVTensors,
    TransferConfig,
    TransferError,
    ucx_runtime,
)
from services.transfer.handshake import HANDSHAKE_PROTOCOL
from services.transfer.peers import parse_peer
from services.transfer.wire import FRAME_BYTES, decode_frame, request

FP = KVFingerprint(model="tiny", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
NUM_BLOCKS = 16


def token_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    return str(path)


class Side:
    """A receiver (and its cache) on loopback, and a rogue that speaks to it over plain sockets."""

    def __init__(self, config: TransferConfig) -> None:
        self.cache = torch.zeros(FP.num_layers, 2, NUM_BLOCKS, FP.block_size, FP.num_kv_heads, FP.head_dim)
        self.receiver = KVReceiver(self.cache, FP, config)
        self.config = config
        self.addr = ""

    async def rogue(self, hello: Any) -> Any:
        """Send one handshake on a bare TCP connection and return the receiver's reply."""
        reader, writer = await asyncio.open_connection(*parse_peer(self.addr))
        try:
            return await request(reader, writer, hello, kv_pb2.HandshakeReply)
        finally:
            writer.transport.abort()

    async def raw(self, data: bytes) -> bytes:
        """Send `data` on a bare TCP connection, then whatever the receiver answers before it closes the connection."""
        reader, writer = await asyncio.open_connection(*parse_peer(self.addr))
        try:
            writer.write(data)
            writer.write_eof()
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.transport.abort()

    async def hand_off(self, sender_config: TransferConfig, rid: str, blocks: list[int]) -> None:
        """A real hand-off of one request into `blocks`, checked byte for byte."""
        sender = KVSender(FP, sender_config)
        try:
            n = len(blocks) * FP.block_size
            kv = make_kv(FP, n, seed=len(rid))
            self.receiver.expect(rid, blocks, 0, n)
            for layer in range(FP.num_layers):
                await sender.send(self.addr, rid, layer, 0, KVTensors(kv[layer, 0], kv[layer, 1]))
            await self.receiver.wait(rid)
            slots = (torch.as_tensor(blocks)[:, None] * FP.block_size + torch.arange(FP.block_size)).flatten()
            flat = self.cache.view(FP.num_layers, 2, -1, FP.num_kv_heads, FP.head_dim)
            assert torch.equal(flat[:, :, slots], kv)
        finally:
            await sender.close()

    async def settled(self) -> None:
        """Until every refused connection is gone; then nothing is expected or held."""
        for _ in range(200):
            if self.receiver.num_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert self.receiver.num_connections == 0
        assert self.receiver.pending() == []


@pytest.fixture
async def side(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Side]:
    token = getattr(request, "param", "")
    config = TransferConfig(timeout_s=5.0, token_file=token_file(tmp_path, "kv-token", token) if token else "")
    s = Side(config)
    s.addr = await s.receiver.start()
    yield s
    await s.receiver.close()


def hello(**fields: Any) -> Any:
    """A handshake that is right in every field but those given (the node's own address, a fresh tag)."""
    msg = kv_pb2.HandshakeRequest(
        fingerprint=FP.to_proto(), worker_address=ucx_runtime.node().address, tag=7, protocol=HANDSHAKE_PROTOCOL
    )
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def mutate(fn: Callable[[bytearray], None]) -> Callable[[bytes], bytes]:
    def apply(address: bytes) -> bytes:
        changed = bytearray(address)
        fn(changed)
        return bytes(changed)

    return apply


def _set(index: int, value: int) -> Callable[[bytearray], None]:
    def put(b: bytearray) -> None:
        b[index] = value

    return put


# Worker addresses made from this process's own one (so every other field is right), and what the refusal says.
BAD_ADDRESSES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "64 random bytes, version 9": (lambda a: bytes([0x09]) + random.Random(1).randbytes(63), "version 9"),
    "random bytes, each version": (lambda a: random.Random(2).randbytes(64), "worker address"),
    "empty": (lambda a: b"", "0 bytes"),
    "truncated": (lambda a: a[:-1], "ends inside"),
    "trailing bytes": (lambda a: a + b"\0\0\0", "past its end"),
    "oversized": (lambda a: a + bytes(3000), "not 2..2048"),
    "version 2": (mutate(_set(0, 0x22)), "version 2"),
    "debug name flag": (mutate(_set(0, 0x30)), "flags 0x3"),
    "no transports": (lambda a: a[:9] + b"\xff", "no transports"),
}


@pytest.mark.parametrize("case", list(BAD_ADDRESSES))
async def test_garbage_worker_address_is_refused_and_receiver_serves_on(side: Side, case: str) -> None:
    make, says = BAD_ADDRESSES[case]
    reply = await side.rogue(hello(worker_address=make(ucx_runtime.node().address)))
    assert not reply.ok and says in reply.error, reply.error
    await side.settled()
    await side.hand_off(side.config, f"after-{case}", [3, 9])
    await side.settled()


async def test_rogue_fields_are_refused_one_by_one(side: Side) -> None:
    cases = {
        "protocol 0": (hello(protocol=0), "handshake protocol 0"),
        "protocol 99": (hello(protocol=99), "handshake protocol 99"),
        "tag 0": (hello(tag=0), "tag 0"),
        "wrong layout": (hello(fingerprint=KVFingerprint("tiny", "float32", 4, 3, 2, 16).to_proto()), "head_dim"),
        "unknown dtype": (hello(fingerprint=kv_pb2.KVFingerprint(model="m", dtype="int3")), "dtype"),
        "ring key cut short": (hello(staging=kv_pb2.SharedRegion(rkey=b"\x01" + bytes(8), address=1, bytes=8)),
                               "ends inside"),
        "ring key too long": (hello(staging=kv_pb2.SharedRegion(rkey=b"\x01" + bytes(2000), address=1, bytes=8)),
                              "not 9..1024"),
        "ring key memory type": (hello(staging=kv_pb2.SharedRegion(rkey=b"\x01" + bytes(7) + b"\x63\0", address=1,
                                                                   bytes=8)), "memory type 99"),
        "cache of 0 bytes": (hello(cache=kv_pb2.SharedRegion(rkey=b"\x01" + bytes(8) + b"\0", address=1, bytes=0)),
                             "do not make a region"),
        "cache at 0": (hello(cache=kv_pb2.SharedRegion(rkey=b"\x01" + bytes(8) + b"\0", address=0, bytes=8)),
                       "do not make a region"),
    }
    for name, (msg, says) in cases.items():
        reply = await side.rogue(msg)
        assert not reply.ok and says in reply.error, (name, reply.error)
    await side.settled()
    await side.hand_off(side.config, "after-fields", [0, 1, 2])
    await side.settled()


async def test_region_larger_than_what_is_shared_is_not_read(side: Side) -> None:
    """A real shared-memory region that claims 1 GiB: the receiver will not map past its real end."""
    node = ucx_runtime.node()
    region = node.allocate(1 << 16)
    try:
        claimed = kv_pb2.SharedRegion(rkey=region.rkey, address=region.address, bytes=1 << 30)
        reply = await side.rogue(hello(staging=claimed, tag=11))
        assert reply.ok and not reply.staging
        honest = kv_pb2.SharedRegion(rkey=region.rkey, address=region.address, bytes=1 << 16)
        reply = await side.rogue(hello(staging=honest, tag=12))
        assert reply.ok and reply.staging
    finally:
        region.close()
    await side.settled()
    await side.hand_off(side.config, "after-region", [5])


@pytest.mark.parametrize("side", ["s3cret-kv-token"], indirect=True)
async def test_kv_token_is_required(side: Side, tmp_path: Path) -> None:
    for offered, says in ((b"", "no KV token"), (b"s3cret-kv-tokeN", "wrong KV token"), (b"s3cret", "wrong KV")):
        reply = await side.rogue(hello(token=offered))
        assert not reply.ok and says in reply.error
    # Refused before the address is looked at: a garbage address with no token never reaches UCX.
    reply = await side.rogue(hello(worker_address=bytes([0x09]) + os.urandom(63)))
    assert not reply.ok and "no KV token" in reply.error
    for name, value in (("none", ""), ("wrong", "another-token")):
        config = TransferConfig(timeout_s=5.0, token_file=token_file(tmp_path, name, value) if value else "")
        sender = KVSender(FP, config)
        try:
            kv = make_kv(FP, 4, seed=1)
            with pytest.raises(KVIncompatible) as info:
                await sender.send(side.addr, "x", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))
            assert "refused" in str(info.value) and "KV token" in str(info.value)
        finally:
            await sender.close()
    await side.settled()
    right = TransferConfig(timeout_s=5.0, token_file=token_file(tmp_path, "right", "s3cret-kv-token"))
    await side.hand_off(right, "with-token", [4, 6])


BAD_STREAMS: dict[str, bytes] = {
    "nothing": b"",
    "half a frame": bytes(FRAME_BYTES // 2),
    "random frame": random.Random(5).randbytes(FRAME_BYTES),
    "length past the frame": (FRAME_BYTES).to_bytes(4, "little") + bytes(FRAME_BYTES - 4),
    "HTTP": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
async def test_garbage_on_the_control_connection_is_refused(side: Side, case: str) -> None:
    answer = await side.raw(BAD_STREAMS[case])
    if answer:  # a whole frame that is not a handshake gets a refusal; anything shorter, only the close
        reply = decode_frame(answer, kv_pb2.HandshakeReply)
        assert not reply.ok and reply.error
    await side.settled()
    await side.hand_off(side.config, f"after-{case}", [1, 2])
    await side.settled()


async def test_a_silent_peer_is_let_go_after_the_timeout(tmp_path: Path) -> None:
    s = Side(TransferConfig(timeout_s=0.5))
    s.addr = await s.receiver.start()
    try:
        reader, writer = await asyncio.open_connection(*parse_peer(s.addr))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the receiver, not by us
        writer.transport.abort()
        await s.settled()
    finally:
        await s.receiver.close()


async def test_the_listener_binds_to_the_advertised_address_alone() -> None:
    s = Side(TransferConfig(timeout_s=5.0, host="127.0.0.2"))
    s.addr = await s.receiver.start()
    try:
        host, port = parse_peer(s.addr)
        assert host == "127.0.0.2"
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A"]  # local address of each socket in state LISTEN
        assert f"0200007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening
        await s.hand_off(s.config, "bound", [0, 5])
    finally:
        await s.receiver.close()


def test_token_file_that_cannot_be_read_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the KV token file"):
        KVSender(FP, TransferConfig(token_file=str(tmp_path / "missing")))
    empty = token_file(tmp_path, "empty", "")
    with pytest.raises(ValueError, match="is empty"):
        KVSender(FP, TransferConfig(token_file=empty))


GARBAGE_HEADERS: dict[str, bytes] = {
    "random": random.Random(3).randbytes(300),
    "truncated": kv_pb2.KVHeader(request_id="h", layer=0, num_tokens=4, payload_bytes=256).SerializeToString()[:-2],
    "oversized": kv_pb2.KVHeader(request_id="h" * 70000).SerializeToString(),
    "layer out of range": kv_pb2.KVHeader(request_id="h", layer=3, num_tokens=4, payload_bytes=256,
                                          k_address=1, v_address=2).SerializeToString(),
    "garbage keys": kv_pb2.KVHeader(request_id="h", layer=0, num_tokens=4, payload_bytes=256, k_address=1,
                                    v_address=2, k_rkey=b"\x09" * 5, v_rkey=b"\x09" * 5).SerializeToString(),
    "too many blocks": kv_pb2.KVHeader(request_id="h", layer=0, num_tokens=4, payload_bytes=256, k_address=1,
                                       v_address=2, source_blocks=[1] * 5000).SerializeToString(),
}


@pytest.mark.parametrize("case", list(GARBAGE_HEADERS))
async def test_malformed_kv_header_drops_only_its_connection(side: Side, case: str) -> None:
    side.receiver.expect("h", [2], 0, 4)
    sender = KVSender(FP, side.config)
    try:
        kv = make_kv(FP, 1, seed=2)
        await sender.send(side.addr, "h", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))  # opens the connection
        sender._links.by_peer[side.addr].data.send(GARBAGE_HEADERS[case])
        with pytest.raises(TransferError) as info:
            await side.receiver.wait("h")
        assert info.value.reason == "bad_header"
    finally:
        await sender.close()
    await side.settled()
    await side.hand_off(side.config, f"after-{case}", [7, 8])
    await side.settled()
