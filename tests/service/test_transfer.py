"""KV hand-off over real UCX on loopback (and between two real Ray actors)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import torch

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
)

FP = KVFingerprint(model="tiny", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
CFG = TransferConfig(timeout_s=5.0)
NUM_BLOCKS = 64


def slots_of(block_ids: list[int], start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    return torch.as_tensor(block_ids)[pos // FP.block_size] * FP.block_size + pos % FP.block_size


def stored(cache: torch.Tensor, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    flat = cache.view(FP.num_layers, 2, -1, FP.num_kv_heads, FP.head_dim)
    return flat[:, :, slots_of(block_ids, start, end)]


async def send_all(sender: KVSender, peer: str, rid: str, start: int, kv: torch.Tensor, chunk: int) -> int:
    """Send every layer of kv ([layers, 2, n, heads, dim], tokens from `start`) in chunks of `chunk` tokens."""
    sent = 0
    for lo in range(0, kv.shape[2], chunk):
        hi = min(lo + chunk, kv.shape[2])
        for layer in range(FP.num_layers):
            sent += await sender.send(peer, rid, layer, start + lo, KVTensors(kv[layer, 0, lo:hi], kv[layer, 1, lo:hi]))
    return sent


class Pair:
    def __init__(self, config: TransferConfig) -> None:
        self.cache = torch.zeros(FP.num_layers, 2, NUM_BLOCKS, FP.block_size, FP.num_kv_heads, FP.head_dim)
        self.receiver = KVReceiver(self.cache, FP, config)
        self.sender = KVSender(FP, config)
        self.addr = ""


# Every pair test runs both ways KV can travel: staged in the sender's shared-memory ring and
# copied out of its mapping, or registered in place and fetched by RMA get (as CUDA tensors are);
# and staged once more with a receiver that sleeps between headers instead of polling for them.
PAIR_CONFIGS = {
    "staged": CFG,
    "in_place": TransferConfig(timeout_s=CFG.timeout_s, staging_mib=0),
    "no_spin": TransferConfig(timeout_s=CFG.timeout_s, spin_us=0),
}


@pytest.fixture(params=list(PAIR_CONFIGS))
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    p = Pair(PAIR_CONFIGS[request.param])
    p.addr = await p.receiver.start()
    yield p
    await p.sender.close()
    await p.receiver.close()


async def test_round_trip_several_requests_partial_ranges(pair: Pair) -> None:
    rng = random.Random(0)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    requests = []
    for i, (start, end) in enumerate([(0, 9), (5, 23), (13, 14), (2, 31)]):
        nblocks = (end + FP.block_size - 1) // FP.block_size
        blocks, free = free[:nblocks], free[nblocks:]
        pair.receiver.expect(f"r{i}", blocks, start, end)
        requests.append((f"r{i}", blocks, start, end, make_kv(FP, end - start, seed=i)))
    assert sorted(pair.receiver.pending()) == ["r0", "r1", "r2", "r3"]

    sent = await asyncio.gather(
        *(send_all(pair.sender, pair.addr, rid, s, kv, chunk=5 + i) for i, (rid, _, s, _, kv) in enumerate(requests))
    )
    for (rid, blocks, start, end, kv), nbytes in zip(requests, sent, strict=True):
        await pair.receiver.wait(rid)
        assert nbytes == FP.num_layers * FP.payload_bytes(end - start)
        assert torch.equal(stored(pair.cache, blocks, start, end), kv)
    assert pair.receiver.pending() == []
    # One endpoint carried every request.
    assert pair.sender.connects == 1 and pair.receiver.num_connections == 1
    # Nothing outside the reserved blocks was touched.
    used = {b for _, blocks, *_ in requests for b in blocks}
    untouched = [b for b in range(NUM_BLOCKS) if b not in used]
    assert pair.cache[:, :, untouched].abs().sum() == 0


async def test_handshake_mismatch_is_refused(pair: Pair) -> None:
    other = KVFingerprint(model="tiny", dtype="float32", block_size=4, num_layers=3, num_kv_heads=4, head_dim=16)
    sender = KVSender(other, CFG)
    try:
        k = torch.zeros(2, 4, 16)
        with pytest.raises(KVIncompatible) as info:
            await sender.send(pair.addr, "x", 0, 0, KVTensors(k, k))
        msg = str(info.value)
        assert info.value.reason == "incompatible"
        assert "num_kv_heads: local=2 remote=4" in msg and "head_dim: local=8 remote=16" in msg
        assert "block_size" not in msg
    finally:
        await sender.close()


async def test_wait_times_out_when_nothing_is_sent(pair: Pair) -> None:
    pair.receiver.expect("idle", [1, 2], 0, 8)
    with pytest.raises(TransferError) as info:
        await pair.receiver.wait("idle", timeout=0.2)
    assert info.value.reason == "timeout"
    assert pair.receiver.pending() == []
    with pytest.raises(KeyError, match="idle"):
        await pair.receiver.wait("idle")


async def test_cancel_drains_late_payload_and_next_request_works(pair: Pair) -> None:
    pair.receiver.expect("gone", [3, 4], 0, 8)
    waiter = asyncio.ensure_future(pair.receiver.wait("gone"))
    await asyncio.sleep(0)
    pair.receiver.cancel("gone")
    with pytest.raises(TransferError) as info:
        await waiter
    assert info.value.reason == "cancelled"
    # The payload for the cancelled request still arrives: it must be drained, not written.
    await send_all(pair.sender, pair.addr, "gone", 0, make_kv(FP, 8, seed=1), chunk=8)
    pair.receiver.expect("next", [5, 6, 7], 1, 11)
    kv = make_kv(FP, 10, seed=2)
    await send_all(pair.sender, pair.addr, "next", 1, kv, chunk=3)
    await pair.receiver.wait("next")
    assert torch.equal(stored(pair.cache, [5, 6, 7], 1, 11), kv)
    assert pair.cache[:, :, [3, 4]].abs().sum() == 0


async def test_range_outside_expectation_is_bad_header(pair: Pair) -> None:
    pair.receiver.expect("narrow", [8, 9], 2, 6)
    kv = make_kv(FP, 6, seed=3)
    await send_all(pair.sender, pair.addr, "narrow", 0, kv, chunk=6)  # tokens [0, 6) but [2, 6) expected
    with pytest.raises(TransferError) as info:
        await pair.receiver.wait("narrow")
    assert info.value.reason == "bad_header" and "outside the expected [2, 6)" in str(info.value)
    # The stream stayed in sync: the same connection still delivers the next request.
    pair.receiver.expect("after", [10], 0, 4)
    kv = make_kv(FP, 4, seed=4)
    await send_all(pair.sender, pair.addr, "after", 0, kv, chunk=4)
    await pair.receiver.wait("after")
    assert torch.equal(stored(pair.cache, [10], 0, 4), kv)
    assert pair.sender.connects == 1


async def test_malformed_header_fails_request_and_closes_connection(pair: Pair) -> None:
    pair.receiver.expect("bad", [11], 0, 4)
    kv = make_kv(FP, 1, seed=5)
    await pair.sender.send(pair.addr, "bad", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))  # opens the connection
    data = pair.sender._links.by_peer[pair.addr].data
    header = kv_pb2.KVHeader(request_id="bad", layer=1, token_start=1, num_tokens=2, payload_bytes=12345)
    data.send(header.SerializeToString())
    with pytest.raises(TransferError) as info:
        await pair.receiver.wait("bad")
    assert info.value.reason == "bad_header" and "payload_bytes=12345" in str(info.value)
    for _ in range(100):
        if pair.receiver.num_connections == 0:
            break
        await asyncio.sleep(0.02)
    assert pair.receiver.num_connections == 0


async def test_garbage_on_the_data_path_closes_the_connection(pair: Pair) -> None:
    pair.receiver.expect("junk", [12], 0, 4)
    kv = make_kv(FP, 1, seed=5)
    await pair.sender.send(pair.addr, "junk", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))
    pair.sender._links.by_peer[pair.addr].data.send(b"\xff" * 40)
    with pytest.raises(TransferError) as info:
        await pair.receiver.wait("junk")
    assert info.value.reason == "bad_header" and "malformed KV header" in str(info.value)


async def test_unacknowledged_send_times_out_and_drops_the_connection() -> None:
    cache = torch.zeros(FP.num_layers, 2, NUM_BLOCKS, FP.block_size, FP.num_kv_heads, FP.head_dim)
    receiver = KVReceiver(cache, FP, CFG)
    sender = KVSender(FP, TransferConfig(timeout_s=0.5))
    try:
        addr = await receiver.start()
        receiver._on_events = lambda conn, events: None  # type: ignore[method-assign]  # a decode side that never answers
        kv = make_kv(FP, 4, seed=6)
        with pytest.raises(TransferError) as info:
            await sender.send(addr, "mute", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))
        assert info.value.reason == "timeout"
        assert addr not in sender.peers and not sender._in_flight.pending
        assert len(sender._in_flight.retired) == 1  # its memory is held a while: the peer might still read it
    finally:
        await sender.close()
        await receiver.close()


async def test_send_to_closed_receiver_is_peer_gone_and_endpoint_dropped() -> None:
    cache = torch.zeros(FP.num_layers, 2, NUM_BLOCKS, FP.block_size, FP.num_kv_heads, FP.head_dim)
    receiver = KVReceiver(cache, FP, CFG)
    addr = await receiver.start()
    sender = KVSender(FP, TransferConfig(timeout_s=2.0))
    kv = make_kv(FP, 4, seed=6)
    try:
        receiver.expect("a", [0], 0, 4)
        await send_all(sender, addr, "a", 0, kv, chunk=4)
        await receiver.wait("a")
        await receiver.close()
        with pytest.raises(TransferError) as info:
            for _ in range(50):  # the sender learns of the disconnect asynchronously
                await sender.send(addr, "b", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))
                await asyncio.sleep(0.02)
        # The receiver's goodbye drops the connection (peer_gone if a send is waiting); a new
        # connection to the closed listener then fails or times out.
        assert info.value.reason in ("peer_gone", "timeout"), info.value
        assert addr not in sender.peers  # dropped: the next send reconnects
    finally:
        await sender.close()


async def test_sender_disconnect_fails_receiving_request_with_peer_gone(pair: Pair) -> None:
    pair.receiver.expect("half", [12, 13], 0, 8)
    kv = make_kv(FP, 8, seed=7)
    await pair.sender.send(pair.addr, "half", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))  # one layer of three
    await pair.sender.close()
    with pytest.raises(TransferError) as info:
        await pair.receiver.wait("half")
    assert info.value.reason == "peer_gone"


async def test_nothing_listening_is_peer_gone() -> None:
    sender = KVSender(FP, TransferConfig(timeout_s=1.0))
    kv = torch.zeros(1, FP.num_kv_heads, FP.head_dim)
    try:
        with pytest.raises(TransferError) as info:
            await sender.send("127.0.0.1:1", "x", 0, 0, KVTensors(kv, kv))
        assert info.value.reason in ("peer_gone", "timeout")
    finally:
        await sender.close()


async def test_bad_arguments_are_clear_errors(pair: Pair) -> None:
    k = torch.zeros(2, FP.num_kv_heads, FP.head_dim)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        await pair.sender.send(pair.addr, "r", 3, 0, KVTensors(k, k))
    with pytest.raises(ValueError, match="dtype"):
        await pair.sender.send(pair.addr, "r", 0, 0, KVTensors(k.double(), k.double()))
    with pytest.raises(ValueError, match="host:port"):
        await pair.sender.send("nowhere", "r", 0, 0, KVTensors(k, k))
    with pytest.raises(ValueError, match="blocks"):
        pair.receiver.expect("r", [1], 0, 9)
    with pytest.raises(ValueError, match="block ids"):
        pair.receiver.expect("r", [NUM_BLOCKS], 0, 4)
    pair.receiver.expect("r", [1], 0, 4)
    with pytest.raises(ValueError, match="already expected"):
        pair.receiver.expect("r", [1], 0, 4)
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        KVReceiver(torch.zeros(3, 2, 4, 4, 2, 4), FP, CFG)


@pytest.mark.parametrize("cache_blocks", [0, NUM_BLOCKS], ids=["tensors", "shared_cache"])
def test_two_ray_actors_move_kv(cache_blocks: int) -> None:
    import ray

    from services.bench.transfer_actors import DecodeSide, PrefillSide

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        decode = ray.remote(num_cpus=0)(DecodeSide).remote(FP, CFG, NUM_BLOCKS)
        prefill = ray.remote(num_cpus=0)(PrefillSide).remote(FP, CFG, cache_blocks)
        addr = ray.get(decode.start.remote())
        assert ray.get(prefill.start.remote()) == bool(cache_blocks)
        for i, (start, end) in enumerate([(0, 13), (3, 40)]):
            blocks = random.Random(i).sample(range(NUM_BLOCKS), (end + 3) // 4)
            ray.get(decode.expect.remote(f"q{i}", blocks, start, end))
            done = decode.wait.remote(f"q{i}")
            ray.get(prefill.send_request.remote(addr, f"q{i}", start, end - start, i))
            ray.get(done)
            got = ray.get(decode.read.remote(f"q{i}"))
            assert torch.equal(got, make_kv(FP, end - start, seed=i))
        assert ray.get(prefill.connects.remote()) == 1
        ray.get([prefill.close.remote(), decode.close.remote()])
    finally:
        ray.shutdown()


BIG = KVFingerprint(model="big", dtype="float32", block_size=16, num_layers=2, num_kv_heads=8, head_dim=128)


async def test_layers_of_every_size_sent_together_land_exactly() -> None:
    """Many sends in flight at once, from one token to a multi-MiB layer, over random blocks."""
    sizes = [3, 130, 1100, 5]
    total = sum(sizes)
    nblocks = total // BIG.block_size + len(sizes) + 1
    cache = torch.zeros(BIG.num_layers, 2, nblocks, BIG.block_size, BIG.num_kv_heads, BIG.head_dim)
    receiver = KVReceiver(cache, BIG, CFG)
    sender = KVSender(BIG, CFG)
    try:
        addr = await receiver.start()
        blocks = random.Random(1).sample(range(nblocks), (total + BIG.block_size - 1) // BIG.block_size)
        receiver.expect("mix", blocks, 0, total)
        kv = make_kv(BIG, total, seed=9)
        sends, start = [], 0
        for n in sizes:
            for layer in range(BIG.num_layers):
                k, v = kv[layer, 0, start : start + n], kv[layer, 1, start : start + n]
                sends.append(asyncio.ensure_future(sender.send(addr, "mix", layer, start, KVTensors(k, v))))
            start += n
        assert sum(await asyncio.gather(*sends)) == BIG.num_layers * BIG.payload_bytes(total)
        await receiver.wait("mix")
        flat = cache.view(BIG.num_layers, 2, -1, BIG.num_kv_heads, BIG.head_dim)
        pos = torch.arange(total)
        slots = torch.as_tensor(blocks)[pos // BIG.block_size] * BIG.block_size + pos % BIG.block_size
        assert torch.equal(flat[:, :, slots], kv)
        assert not sender._in_flight.pending and not sender._in_flight.retired  # every send acknowledged and released
    finally:
        await sender.close()
        await receiver.close()


async def test_sends_of_a_cancelled_request_are_acknowledged_not_fetched(pair: Pair) -> None:
    kvs = {rid: make_kv(FP, 6, seed=20 + i) for i, rid in enumerate(("c1", "c2", "c3"))}
    blocks = {"c1": [20, 21], "c2": [22, 23], "c3": [24, 25]}
    for rid in kvs:
        pair.receiver.expect(rid, blocks[rid], 0, 6)
    await send_all(pair.sender, pair.addr, "c1", 0, kvs["c1"][:, :, :1], chunk=1)  # connect first
    pair.receiver.cancel("c2")
    await asyncio.gather(
        *(
            pair.sender.send(pair.addr, rid, layer, 0, KVTensors(kv[layer, 0], kv[layer, 1]))
            for rid, kv in kvs.items()
            for layer in range(FP.num_layers)
        )
    )
    for rid in ("c1", "c3"):
        await pair.receiver.wait(rid)
        assert torch.equal(stored(pair.cache, blocks[rid], 0, 6), kvs[rid])
    assert pair.cache[:, :, blocks["c2"]].abs().sum() == 0
    assert not pair.sender._in_flight.pending


async def test_header_pointing_outside_the_staging_ring_is_refused(pair: Pair) -> None:
    pair.receiver.expect("far", [14], 0, 4)
    kv = make_kv(FP, 1, seed=5)
    await pair.sender.send(pair.addr, "far", 0, 0, KVTensors(kv[0, 0], kv[0, 1]))
    header = kv_pb2.KVHeader(
        request_id="far",
        layer=1,
        token_start=1,
        num_tokens=1,
        payload_bytes=FP.payload_bytes(1),
        sequence=99,
        k_address=8,
        v_address=8,
    )
    pair.sender._links.by_peer[pair.addr].data.send(header.SerializeToString())
    with pytest.raises(TransferError) as info:
        await pair.receiver.wait("far")
    assert info.value.reason == "bad_header" and "staging ring" in str(info.value)


async def test_ring_on_another_host_is_fetched_by_rma_get(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring the receiver cannot map (a sender on another host) is read with UCX gets instead."""
    from services.transfer import native

    monkeypatch.setattr(native.RemoteKey, "local_address", lambda self, remote: 0)
    p = Pair(CFG)
    try:
        p.addr = await p.receiver.start()
        blocks = [30, 2, 31]
        p.receiver.expect("remote", blocks, 1, 11)
        kv = make_kv(FP, 10, seed=12)
        await send_all(p.sender, p.addr, "remote", 1, kv, chunk=4)
        await p.receiver.wait("remote")
        assert torch.equal(stored(p.cache, blocks, 1, 11), kv)
        link = next(iter(p.receiver._links.values()))
        assert link.ring is not None and link.ring.region is not None and link.ring.region.mapped == 0
    finally:
        await p.sender.close()
        await p.receiver.close()


async def test_ring_the_receiver_cannot_reach_means_in_place_for_that_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.transfer import native

    unpack = native.Connection.unpack
    calls = []

    def first_fails(self: native.Connection, rkey: bytes) -> native.RemoteKey:
        calls.append(rkey)
        if len(calls) == 1:  # the handshake's: the sender's ring
            raise native.NativeError("unpacking a remote key failed", -6)
        return unpack(self, rkey)

    monkeypatch.setattr(native.Connection, "unpack", first_fails)
    p = Pair(CFG)
    try:
        p.addr = await p.receiver.start()
        p.receiver.expect("apart", [5, 9], 0, 8)
        kv = make_kv(FP, 8, seed=13)
        await send_all(p.sender, p.addr, "apart", 0, kv, chunk=8)
        await p.receiver.wait("apart")
        assert torch.equal(stored(p.cache, [5, 9], 0, 8), kv)
        assert not p.sender._links.by_peer[p.addr].staged
        assert len(calls) == 1 + 2 * FP.num_layers  # then a key for K and for V of every layer
    finally:
        await p.sender.close()
        await p.receiver.close()
