"""A decode reservation that nobody claims is released when its lease runs out: no block is stranded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.decode.worker import DecodeWorker
from services.engine.config import CacheConfig, EngineConfig
from services.engine.sampling_params import SamplingParams
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError


@pytest.fixture
def worker(small_model: Path) -> DecodeWorker:
    config = EngineConfig(model=str(small_model), cache=CacheConfig(num_blocks=256))
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
        async for _ in worker.generate("r1", list(range(10, 100)), params, first_token=5):
            pass
    worker.async_engine.stop()


async def test_abort_releases_a_reservation(worker: DecodeWorker) -> None:
    params = SamplingParams(temperature=0, max_tokens=4)
    await worker.reserve("r2", list(range(10, 60)), params, lease_s=30)
    assert await worker.abort("r2")
    info = await worker.load(check_integrity=True)
    assert info.num_used_blocks == 0 and info.num_reservations == 0 and info.integrity_error is None
    worker.async_engine.stop()
