"""What a hand-off's KV crossed, as the receiver reports it: per connection (logged) and per request (`KVArrival`).

On one host the decode side maps the sender's memory and copies out of it ("shm"); where it cannot, it
reads with RMA gets over the UCX transports its connection's lanes use ("tcp" to another host).
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from services.bench.transfer_actors import make_kv
from services.transfer import KVFingerprint, KVReceiver, KVSender, KVTensors, TransferConfig, native
from services.transfer.peers import answers_gets
from services.transfer.recv_paths import joined, ucx_transport

FP = KVFingerprint(model="tiny", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
NUM_BLOCKS = 32
UCX_NAMES = {"posix", "sysv", "cma", "tcp", "xpmem", "knem"}  # what UCX_TLS may bring on a host without RDMA


async def _hand_off(config: TransferConfig, rid: str) -> tuple[str, str, list[native.Lane]]:
    """Send one request over a fresh pair; (its KVArrival.transport, the connection's, the connection's lanes)."""
    cache = torch.zeros(FP.num_layers, 2, NUM_BLOCKS, FP.block_size, FP.num_kv_heads, FP.head_dim)
    receiver, sender = KVReceiver(cache, FP, config), KVSender(FP, config)
    try:
        peer = await receiver.start()
        blocks = random.Random(rid).sample(range(NUM_BLOCKS), 3)
        receiver.expect(rid, blocks, 0, 10)
        kv = make_kv(FP, 10, seed=3)
        for layer in range(FP.num_layers):
            await sender.send(peer, rid, layer, 0, KVTensors(kv[layer, 0], kv[layer, 1]))
        arrival = await receiver.wait(rid)
        (link,) = receiver._links.values()
        assert link.data is not None
        return arrival.transport, link.transport, link.data.transports()
    finally:
        await sender.close()
        await receiver.close()


async def test_a_connection_on_this_host_reads_over_shm(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.transfer"):
        request, connection, lanes = await _hand_off(TransferConfig(timeout_s=5.0), "mapped")
    assert request == connection == "shm"
    assert lanes and all(lane.transport and lane.device for lane in lanes)
    said = [r.getMessage() for r in caplog.records if "reads over" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("KV connection 0 from 127.0.0.1:"), said
    assert said[0].endswith("reads over shm (the sender's memory mapped here)")


async def test_gets_in_place_report_the_lanes_ucx_chose(caplog: pytest.LogCaptureFixture) -> None:
    """No staging ring: the sender registers its tensors, and they are read with RMA gets (cma on one host)."""
    with caplog.at_level(logging.INFO, logger="services.transfer"):
        request, connection, lanes = await _hand_off(TransferConfig(timeout_s=5.0, staging_mib=0), "in-place")
    assert request == connection == ucx_transport(lanes)
    assert "shm" not in request and "self" not in request
    assert set(request.split("+")) <= UCX_NAMES, request
    said = [r.getMessage() for r in caplog.records if "reads over" in r.getMessage()]
    assert len(said) == 1 and f"reads over {request} (device " in said[0], said


async def test_memory_that_cannot_be_mapped_is_read_over_ucx(monkeypatch: pytest.MonkeyPatch) -> None:
    """As from another host: the ring the sender shares is not mapped here, so gets fetch it."""
    monkeypatch.setattr(native.RemoteKey, "local_address", lambda self, remote: 0)
    request, connection, lanes = await _hand_off(TransferConfig(timeout_s=5.0), "unmapped")
    assert request == connection == ucx_transport(lanes) != "shm"


def test_a_tcp_only_hand_off_reports_tcp() -> None:
    """UCX_TLS=tcp in both actors: nothing is mapped, and the KV crosses tcp (as between two hosts)."""
    import ray

    from services.bench.transfer_actors import DecodeSide, PrefillSide

    config = TransferConfig(timeout_s=5.0, ucx_tls="tcp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        decode = ray.remote(num_cpus=0)(DecodeSide).remote(FP, config, NUM_BLOCKS)
        prefill = ray.remote(num_cpus=0)(PrefillSide).remote(FP, config, NUM_BLOCKS)
        peer = ray.get(decode.start.remote())
        ray.get(prefill.start.remote())
        ray.get(decode.expect.remote("tcp", [4, 9, 2, 7], 0, 13))
        done = decode.wait.remote("tcp")
        ray.get(prefill.send_request.remote(peer, "tcp", 0, 13, 5))
        assert ray.get(done).transport == "tcp"
        assert torch.equal(ray.get(decode.read.remote("tcp")), make_kv(FP, 13, seed=5))
        ray.get([prefill.close.remote(), decode.close.remote()])
    finally:
        ray.shutdown()


def test_transport_names() -> None:
    lane = native.Lane
    assert ucx_transport([lane("self", "memory"), lane("cma", "memory"), lane("sysv", "memory")]) == "cma+sysv"
    assert ucx_transport([lane("tcp", "eth0"), lane("tcp", "eth1")]) == "tcp"
    assert ucx_transport([lane("self", "memory")]) == "self"
    assert joined({"shm", "cma+sysv", "tcp"}) == "cma+shm+sysv+tcp" and joined(set()) == ""


def test_only_a_peer_reading_over_emulated_gets_needs_answers() -> None:
    lane = native.Lane
    assert answers_gets([lane("tcp", "eth0"), lane("tcp", "eth1")])
    assert not answers_gets([lane("tcp", "eth0"), lane("rc_mlx5", "mlx5_0:1")])  # the NIC answers RDMA reads
    assert not answers_gets([lane("sysv", "memory"), lane("cma", "memory"), lane("tcp", "lo")])  # one host
    assert not answers_gets([lane("self", "memory")]) and not answers_gets([])
