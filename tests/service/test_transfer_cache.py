"""Sends from the prefill's KV cache in shared memory (KVSender.allocate_cache), over real UCX on loopback.

On one host the decode side maps that cache, and its KV cache is a sink of routes (see
receiver.py): headers from the mapped cache for an expected request are placed by the data
path's message callback in C, and Python sees only the request's completion. The tests here
check both that path and every way out of it (headers it leaves to Python, cancellation,
connections that end).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from services.bench.transfer_actors import make_kv
from services.proto_gen import kv_pb2
from services.transfer import KVBlocks, KVSender, KVTensors, TransferConfig, TransferError
from tests.service.test_transfer import CFG, FP, NUM_BLOCKS, Pair, slots_of, stored

CACHE_BLOCKS = 40


@asynccontextmanager
async def cache_pair(config: TransferConfig = CFG) -> AsyncIterator[tuple[Pair, torch.Tensor]]:
    """A pair whose sender has a shared KV cache (returned with it), the receiver listening; closed on exit."""
    p = Pair(config)
    try:
        await p.sender.start()
        shape = (FP.num_layers, 2, CACHE_BLOCKS, FP.block_size, FP.num_kv_heads, FP.head_dim)
        source = p.sender.allocate_cache(shape)
        assert source is not None and source.shape == shape and not source.any()
        p.addr = await p.receiver.start()
        yield p, source
    finally:
        await p.sender.close()
        await p.receiver.close()


def put(source: torch.Tensor, table: list[int], start: int, kv: torch.Tensor) -> None:
    """Write a request's KV (tokens from `start`) into the sender's cache at its block table."""
    flat = source.view(FP.num_layers, 2, -1, FP.num_kv_heads, FP.head_dim)
    flat[:, :, slots_of(table, start, start + kv.shape[2])] = kv


def cached_header(sender: KVSender, rid: str, layer: int, start: int, kv: KVBlocks) -> kv_pb2.KVHeader:
    """The header a send of `kv` from the shared cache puts on the wire (its sequence still 0)."""
    header: kv_pb2.KVHeader = sender._header(rid, layer, start, kv)
    return header


async def send_cached_all(p: Pair, rid: str, start: int, n: int, table: list[int], chunk: int) -> int:
    sent = 0
    for lo in range(start, start + n, chunk):
        for layer in range(FP.num_layers):
            sent += await p.sender.send(p.addr, rid, layer, lo, KVBlocks(min(chunk, start + n - lo), table))
    return sent


async def check_cache_round_trip(p: Pair, source: torch.Tensor) -> None:
    rng = random.Random(3)
    # Scattered source blocks, adjacent ones (which merge into longer pieces), ranges starting mid-block.
    cases = [(0, 9, 4), (5, 23, 5), (13, 14, 1), (2, 31, 7)]
    for i, (start, end, chunk) in enumerate(cases):
        nblocks = (end + FP.block_size - 1) // FP.block_size
        table = rng.sample(range(CACHE_BLOCKS), nblocks)
        if i == 3:
            first = rng.randrange(CACHE_BLOCKS - nblocks)
            table = list(range(first, first + nblocks))
        blocks = rng.sample(range(NUM_BLOCKS), nblocks)
        kv = make_kv(FP, end - start, seed=40 + i)
        put(source, table, start, kv)
        p.receiver.expect(f"c{i}", blocks, start, end)
        sent = await send_cached_all(p, f"c{i}", start, end - start, table, chunk)
        await p.receiver.wait(f"c{i}")
        assert sent == FP.num_layers * FP.payload_bytes(end - start)
        assert torch.equal(stored(p.cache, blocks, start, end), kv), i
        p.cache.zero_()
    assert p.sender.connects == 1 and not p.sender._in_flight.pending


def count_fetches(p: Pair) -> list[str]:
    """Request ids of the headers that Python fetched itself (not placed through a route)."""
    fetched: list[str] = []
    fetch = p.receiver._fetch

    def counting(link: object, hdr: kv_pb2.KVHeader, exp: object) -> bool:
        fetched.append(hdr.request_id)
        return fetch(link, hdr, exp)  # type: ignore[arg-type]

    p.receiver._fetch = counting  # type: ignore[method-assign]
    return fetched


async def test_sends_from_the_shared_cache_land_exactly() -> None:
    async with cache_pair() as (p, source):
        fetched = count_fetches(p)
        await check_cache_round_trip(p, source)
        assert fetched == []  # every header went through its route
        assert p.sender._links.by_peer[p.addr].cached
        assert p.sender._staging is not None
        ring = p.sender._staging.ring
        assert ring is not None and int(ring.buffer[: 1 << 16].count_nonzero()) == 0  # nothing was staged
        link = next(iter(p.receiver._links.values()))
        assert link.cache is not None and link.cache.region is not None and link.cache.region.mapped


async def test_shared_cache_on_another_host_is_fetched_by_rma_get(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.transfer import native

    monkeypatch.setattr(native.RemoteKey, "local_address", lambda self, remote: 0)
    async with cache_pair() as (p, source):
        await check_cache_round_trip(p, source)
        link = next(iter(p.receiver._links.values()))
        assert link.cache is not None and link.cache.region is not None and link.cache.region.mapped == 0


async def test_shared_cache_the_receiver_cannot_reach_is_staged_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.transfer import native

    unpack = native.Connection.unpack
    calls: list[bytes] = []

    def cache_fails(self: native.Connection, rkey: bytes) -> native.RemoteKey:
        calls.append(rkey)
        if len(calls) == 2:  # the handshake's second: the sender's cache (the ring comes first)
            raise native.NativeError("unpacking a remote key failed", -6)
        return unpack(self, rkey)

    monkeypatch.setattr(native.Connection, "unpack", cache_fails)
    async with cache_pair() as (p, source):
        await check_cache_round_trip(p, source)
        assert not p.sender._links.by_peer[p.addr].cached and p.sender._links.by_peer[p.addr].staged


async def test_header_pointing_outside_the_shared_cache_is_refused() -> None:
    async with cache_pair() as (p, source):
        p.receiver.expect("far", [1, 2], 0, 8)
        await p.sender.send(p.addr, "far", 0, 0, KVBlocks(1, [3]))  # opens the connection
        good = kv_pb2.KVHeader()
        header = cached_header(p.sender, "far", 1, 0, KVBlocks(4, [3]))
        good.CopyFrom(header)
        header.sequence, header.source_blocks[0] = 98, 2 * FP.num_layers * CACHE_BLOCKS  # past the whole region
        p.sender._links.by_peer[p.addr].data.send(header.SerializeToString())
        with pytest.raises(TransferError) as info:
            await p.receiver.wait("far")
        assert info.value.reason == "bad_header" and "shared KV cache" in str(info.value)

        async with cache_pair() as (p2, _):
            p2.receiver.expect("short", [1, 2], 0, 8)
            await p2.sender.send(p2.addr, "short", 0, 0, KVBlocks(1, [3]))
            good.sequence, good.request_id, good.num_tokens, good.payload_bytes = 99, "short", 6, FP.payload_bytes(6)
            p2.sender._links.by_peer[p2.addr].data.send(good.SerializeToString())  # one block cannot hold 6 tokens
            with pytest.raises(TransferError) as info:
                await p2.receiver.wait("short")
            assert info.value.reason == "bad_header" and "do not hold its tokens" in str(info.value)


async def test_shared_cache_bad_arguments_are_clear_errors() -> None:
    plain = Pair(CFG)
    try:
        plain.addr = await plain.receiver.start()
        with pytest.raises(ValueError, match="allocate_cache"):
            await plain.sender.send(plain.addr, "r", 0, 0, KVBlocks(4, [1]))
    finally:
        await plain.sender.close()
        await plain.receiver.close()
    async with cache_pair() as (p, source):
        with pytest.raises(RuntimeError, match="once"):
            p.sender.allocate_cache(tuple(source.shape))
        with pytest.raises(ValueError, match="need 3"):
            await p.sender.send(p.addr, "r", 0, 4, KVBlocks(6, [1, 2]))  # tokens up to 10 need 3 blocks
        with pytest.raises(ValueError, match="block ids"):
            await p.sender.send(p.addr, "r", 0, 0, KVBlocks(4, [CACHE_BLOCKS]))
        with pytest.raises(ValueError, match="at most"):
            await p.sender.send(p.addr, "r", 0, 0, KVBlocks(257 * FP.block_size, [0] * 257))
        with pytest.raises(ValueError, match="num_tokens"):
            await p.sender.send(p.addr, "r", 0, 0, KVBlocks(0, [1]))
        with pytest.raises(ValueError, match="layer 3 out of range"):
            await p.sender.send(p.addr, "r", 3, 0, KVBlocks(4, [1]))
        failed = p.sender.submit(asyncio.get_running_loop(), p.addr, "r", 0, -1, KVBlocks(4, [1]))
        with pytest.raises(ValueError, match="token_start"):
            await asyncio.wrap_future(failed)
    fresh = KVSender(FP, CFG)
    try:
        with pytest.raises(RuntimeError, match="after start"):
            fresh.allocate_cache((FP.num_layers, 2, 4, FP.block_size, FP.num_kv_heads, FP.head_dim))
        await fresh.start()
        with pytest.raises(ValueError, match="shape"):
            fresh.allocate_cache((FP.num_layers, 2, 4, FP.block_size, FP.num_kv_heads, 7))
    finally:
        await fresh.close()


# ---- routes: what the C path takes, and what it leaves to Python --------------------------------


async def test_completion_time_is_when_the_last_layer_landed() -> None:
    async with cache_pair() as (p, source):
        kv = make_kv(FP, 6, seed=7)
        put(source, [4, 9], 0, kv)
        p.receiver.expect("t", [2, 3], 0, 6)
        before = time.monotonic()
        await send_cached_all(p, "t", 0, 6, [4, 9], chunk=6)
        after = time.monotonic()
        landed = await p.receiver.wait("t")
        assert before < landed.at < after and landed.transport == "shm"


async def test_many_sends_in_flight_are_all_acknowledged() -> None:
    """More headers than one batch of acks, none awaited before the next is sent."""
    async with cache_pair() as (p, source):
        n, table = 40, random.Random(5).sample(range(CACHE_BLOCKS), 10)
        kv = make_kv(FP, n, seed=8)
        put(source, table, 0, kv)
        p.receiver.expect("many", list(range(10, 20)), 0, n)
        await p.sender.send(p.addr, "many", 0, 0, KVBlocks(1, table))  # connect first
        sends = [
            p.sender.send(p.addr, "many", layer, t, KVBlocks(1, table))
            for t in range(n)
            for layer in range(FP.num_layers)
            if (layer, t) != (0, 0)
        ]
        assert len(sends) > 64
        await asyncio.wait_for(asyncio.gather(*sends), 5)
        await p.receiver.wait("many")
        assert torch.equal(stored(p.cache, list(range(10, 20)), 0, n), kv)
        assert not p.sender._in_flight.pending


async def test_gets_of_the_headers_of_one_wake_up_are_in_flight_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmapped (another host): every header that arrived together has its gets posted, then waited for once."""
    from services.transfer import native

    monkeypatch.setattr(native.RemoteKey, "local_address", lambda self, remote: 0)
    async with cache_pair() as (p, source):
        batches: list[int] = []
        settle = p.receiver._settle

        def counting(link: Any) -> bool | None:
            batches.append(len(link.posted))
            return settle(link)

        p.receiver._settle = counting  # type: ignore[method-assign]
        tables = {rid: random.Random(rid).sample(range(CACHE_BLOCKS), 3) for rid in ("x", "y")}
        blocks = {"x": [3, 17, 9], "y": [30, 1, 22]}
        kvs = {rid: make_kv(FP, 12, seed=len(rid) + i) for i, rid in enumerate(tables)}
        for rid, table in tables.items():
            put(source, table, 0, kvs[rid])
            p.receiver.expect(rid, blocks[rid], 0, 12)
        sends = [p.sender.send(p.addr, rid, layer, t, KVBlocks(4, tables[rid]))
                 for t in (0, 4, 8) for layer in range(FP.num_layers) for rid in tables]
        await asyncio.wait_for(asyncio.gather(*sends), 5)
        for rid in tables:
            arrival = await p.receiver.wait(rid)
            assert torch.equal(stored(p.cache, blocks[rid], 0, 12), kvs[rid]) and arrival.transport != "shm"
        assert sum(batches) == len(sends) and max(batches) > 1, batches
        assert not p.sender._in_flight.pending


async def test_nothing_lands_for_a_request_after_it_is_cancelled() -> None:
    async with cache_pair() as (p, source):
        kv = make_kv(FP, 8, seed=9)
        put(source, [6, 7], 0, kv)
        p.receiver.expect("gone", [1, 2], 0, 8)
        await p.sender.send(p.addr, "gone", 0, 0, KVBlocks(8, [6, 7]))
        p.receiver.cancel("gone")
        for layer in range(1, FP.num_layers):  # acknowledged, not written
            await asyncio.wait_for(p.sender.send(p.addr, "gone", layer, 0, KVBlocks(8, [6, 7])), 5)
        landed = stored(p.cache, [1, 2], 0, 8)
        assert torch.equal(landed[0], kv[0]) and not landed[1:].any()


async def test_a_request_placed_partly_in_c_and_partly_in_python_completes() -> None:
    """Layer 0 from the shared cache (its route), the others staged (Python), into one request."""
    async with cache_pair() as (p, source):
        fetched = count_fetches(p)
        kv = make_kv(FP, 8, seed=10)
        put(source, [3, 5], 0, kv)
        p.receiver.expect("mixed", [7, 8], 0, 8)
        await p.sender.send(p.addr, "mixed", 0, 0, KVBlocks(8, [3, 5]))
        for layer in range(1, FP.num_layers):
            await p.sender.send(p.addr, "mixed", layer, 0, KVTensors(kv[layer, 0], kv[layer, 1]))
        await p.receiver.wait("mixed")
        assert torch.equal(stored(p.cache, [7, 8], 0, 8), kv)
        assert fetched == ["mixed"] * (FP.num_layers - 1)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_headers_the_c_path_does_not_parse_go_to_python() -> None:
    """Valid protobuf that KVSender never writes: source_blocks unpacked, a field twice."""
    async with cache_pair() as (p, source):
        fetched = count_fetches(p)
        kv = make_kv(FP, 8, seed=11)
        put(source, [2, 4], 0, kv)
        p.receiver.expect("odd", [9, 11], 0, 8)
        await p.sender.send(p.addr, "odd", 0, 0, KVBlocks(8, [2, 4]))  # opens the connection
        data = p.sender._links.by_peer[p.addr].data
        unpacked = cached_header(p.sender, "odd", 1, 0, KVBlocks(8, [2, 4]))
        del unpacked.source_blocks[:]
        unpacked.sequence = 1001
        data.send(unpacked.SerializeToString() + b"".join(b"\x58" + _varint(b) for b in (2, 4)))
        twice = cached_header(p.sender, "odd", 2, 0, KVBlocks(8, [2, 4]))
        twice.sequence = 1002
        data.send(twice.SerializeToString() + b"\x10" + _varint(2))  # layer 2 once more
        await p.receiver.wait("odd")
        assert torch.equal(stored(p.cache, [9, 11], 0, 8), kv)
        assert fetched == ["odd", "odd"]


async def test_a_sender_that_goes_away_mid_request_fails_it_at_once() -> None:
    async with cache_pair() as (p, source):
        put(source, [1, 2], 0, make_kv(FP, 8, seed=12))
        p.receiver.expect("half", [3, 4], 0, 8)
        await p.sender.send(p.addr, "half", 0, 0, KVBlocks(8, [1, 2]))
        await p.sender.close()
        start = time.monotonic()
        with pytest.raises(TransferError) as info:
            await p.receiver.wait("half")
        assert info.value.reason == "peer_gone"
        assert time.monotonic() - start < CFG.timeout_s / 2  # not left to time out
