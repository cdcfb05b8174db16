"""A remote request on the decode side is released through RemoteRequest.close, whichever way it ends.

A reservation nobody claims runs out its lease; an abort, a failed hand-off, a recompute and the
router's choice to prefill a reserved prompt locally each leave no block, expectation or lease behind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from services.decode.worker import DecodeWorker
from services.engine.config import CacheConfig, EngineConfig
from services.engine.sampling_params import SamplingParams
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.kv import KVTensors
from services.transfer.sender import KVSender
from services.worker.fingerprint import kv_fingerprint
from tests.token_worker import generated


@pytest.fixture
def worker(small_model: Path) -> DecodeWorker:
    config = EngineConfig(model=str(small_model), cache=CacheConfig(block_size=16, num_blocks=256))
    return DecodeWorker(config, TransferConfig(timeout_s=5), "decode-test")


async def test_unclaimed_reservation_expires(worker: DecodeWorker) -> None:
    params = SamplingParams(temperature=0, max_tokens=4)
    reservation = await worker.reserve("r1", list(range(10, 100)), params, lease_s=0.2)
    assert reservation.cached_tokens == 0
    held = await worker.load()
    assert held.num_used_blocks == 6 and held.num_reservations == 1  # 90 tokens in blocks of 16

    await asyncio.sleep(0.5)
    info = await worker.load(check_integrity=True, take_deltas=True)
    assert info.num_used_blocks == 0 and info.num_reservations == 0
    assert info.stats.kv_reservations_expired_delta == 1
    assert info.integrity_error is None

    with pytest.raises(TransferError, match="no live reservation"):
        await generated(worker, "r1", list(range(10, 100)), params, first_token=5)
    worker.async_engine.stop()


async def _collect(worker: DecodeWorker, *args: object, **kwargs: object) -> list[int]:
    return [t for batch in await generated(worker, *args, **kwargs) for t in batch.token_ids]


async def _assert_released(worker: DecodeWorker) -> None:
    info = await worker.load(check_integrity=True)
    assert info.num_reservations == 0 and info.integrity_error is None
    assert worker.receiver.pending() == [] and not worker.remote


async def test_abort_releases_a_reservation(worker: DecodeWorker) -> None:
    params = SamplingParams(temperature=0, max_tokens=4)
    await worker.reserve("r2", list(range(10, 60)), params, lease_s=30)
    assert await worker.abort("r2")
    info = await worker.load(check_integrity=True)
    assert info.num_used_blocks == 0 and info.num_reservations == 0 and info.integrity_error is None
    worker.async_engine.stop()


async def test_local_prefill_of_a_reserved_prompt_drops_the_reservation(worker: DecodeWorker) -> None:
    params = SamplingParams(temperature=0, max_tokens=4)
    prompt = list(range(10, 60))
    await worker.reserve("r3", prompt, params, lease_s=30)
    tokens = await _collect(worker, "r3", prompt, params, local=True)
    assert len(tokens) == 4
    await _assert_released(worker)
    worker.async_engine.stop()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
async def test_failed_hand_off_follows_the_policy(small_model: Path, policy: str) -> None:
    config = EngineConfig(model=str(small_model), cache=CacheConfig(block_size=16, num_blocks=256))
    worker = DecodeWorker(config, TransferConfig(timeout_s=5, failure_policy=policy), "decode-test")
    params = SamplingParams(temperature=0, max_tokens=4)
    prompt = list(range(10, 60))
    await worker.reserve("r4", prompt, params, lease_s=30)
    if policy == "recompute":  # the prefill side never delivered: the prompt is computed here
        batches = await generated(worker, "r4", None, None, first_token=None)
        assert batches[0].kv_failure == "peer_gone" and sum(len(b.token_ids) for b in batches) == 4
        assert batches[0].kv_transport is None
    else:
        with pytest.raises(TransferError, match="did not deliver"):
            await _collect(worker, "r4", None, None, first_token=None)
    await _assert_released(worker)
    worker.async_engine.stop()


async def test_abort_while_waiting_for_kv_ends_the_stream(worker: DecodeWorker) -> None:
    params = SamplingParams(temperature=0, max_tokens=4)
    await worker.reserve("r5", list(range(10, 60)), params, lease_s=30)
    task = asyncio.ensure_future(generated(worker, "r5", None, None, first_token=7))
    await asyncio.sleep(0.2)  # generate() has claimed it and waits for KV that never comes
    assert worker.receiver.pending() == ["r5"]
    assert await worker.abort("r5")
    batches = await asyncio.wait_for(task, 5)
    assert [(b.finished, b.finish_reason) for b in batches] == [(True, "abort")]
    await _assert_released(worker)
    assert (await worker.load()).num_used_blocks == 0
    worker.async_engine.stop()


async def test_the_first_batch_says_what_the_kv_came_over(worker: DecodeWorker) -> None:
    """A hand-off from a sender on this host: its KV is copied out of the sender's mapped memory ("shm")."""
    address = (await worker.ready()).kv_address
    assert address is not None
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(10, 40))
    await worker.reserve("r6", prompt, params, lease_s=30)
    fp = kv_fingerprint(worker)
    sender = KVSender(fp, TransferConfig(timeout_s=5))
    try:
        kv = torch.randn(fp.num_layers, 2, len(prompt), fp.num_kv_heads, fp.head_dim).to(fp.torch_dtype)
        for layer in range(fp.num_layers):
            await sender.send(address, "r6", layer, 0, KVTensors(kv[layer, 0], kv[layer, 1]))
        batches = await generated(worker, "r6", None, None, first_token=7)
    finally:
        await sender.close()
    assert batches[0].kv_transport == "shm" and batches[0].kv_failure is None
    assert all(b.kv_transport is None for b in batches[1:]) and sum(len(b.token_ids) for b in batches) == 3
    await _assert_released(worker)
    await worker.receiver.close()
    worker.async_engine.stop()
