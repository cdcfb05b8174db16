"""A prefill worker on CPU keeps its KV cache in shared memory and sends layers straight from it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from services.decode.worker import DecodeWorker
from services.engine import LLM
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.sampling_params import SamplingParams
from services.prefill.worker import PrefillWorker
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from tests.token_worker import generated


@asynccontextmanager
async def worker_pair(
    config: EngineConfig, transfer: TransferConfig
) -> AsyncIterator[tuple[PrefillWorker, DecodeWorker, str]]:
    """A ready prefill and decode worker in this process, and the decode side's KV address."""
    decode = DecodeWorker(config, transfer, "decode-test")
    prefill = PrefillWorker(config, transfer, "prefill-test")
    try:
        peer = (await decode.ready()).kv_address
        await prefill.ready()
        assert peer is not None
        yield prefill, decode, peer
    finally:
        prefill.async_engine.stop()
        decode.async_engine.stop()
        await prefill.sender.close()
        await decode.receiver.close()


async def test_prefill_worker_sends_from_its_shared_cache(small_model: Path) -> None:
    # Chunks of 40 tokens: the 100-token prompt goes in three steps, each from the blocks it filled,
    # two of them starting mid-block.
    config = EngineConfig(
        model=str(small_model),
        cache=CacheConfig(block_size=16, num_blocks=160),
        scheduler=SchedulerConfig(max_num_batched_tokens=40),
    )
    async with worker_pair(config, TransferConfig(timeout_s=10)) as (prefill, decode, peer):
        assert prefill.shared_cache
        assert prefill.sender._cache is not None
        assert prefill.engine.kv_cache.data_ptr() == prefill.sender._cache.tensor.data_ptr()

        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        want = LLM(str(small_model)).generate([list(range(10, 110))], params, use_tqdm=False)[0].token_ids
        for rid, prompt in (("first", list(range(10, 110))), ("again", list(range(10, 110)))):
            reservation = await decode.reserve(rid, prompt, params, lease_s=30)
            result = await prefill.prefill(rid, prompt, params, peer, reservation.cached_tokens)
            batches = await generated(decode, rid, None, None, first_token=result.first_token)
            tokens = [result.first_token] + [t for batch in batches for t in batch.token_ids]
            assert tokens == want, rid
            # Every send was acknowledged, and the blocks held for them are back.
            load = await prefill.load(check_integrity=True)
            assert load.integrity_error is None
            assert not any(h.startswith("kv-send:") for h in prefill.engine.block_manager.req_blocks)
        assert reservation.cached_tokens == 96  # the decode side had the second prompt cached
        conn = prefill.sender._links.by_peer[peer]
        assert conn.cached and not prefill.sender._in_flight.pending
        assert prefill.sender._staging is not None
        ring = prefill.sender._staging.ring
        assert ring is not None and int(ring.buffer[: 1 << 16].count_nonzero()) == 0  # nothing was staged


async def test_blocks_of_a_failed_send_are_held_another_timeout_then_released(small_model: Path) -> None:
    """A decode side that never acknowledges: the prefill fails, and its blocks stay out of reuse a while."""
    config = EngineConfig(model=str(small_model), cache=CacheConfig(block_size=16, num_blocks=160))
    async with worker_pair(config, TransferConfig(timeout_s=0.5)) as (prefill, decode, peer):
        decode.receiver._on_events = lambda conn, events: False  # type: ignore[method-assign]
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        prompt = list(range(10, 60))
        reservation = await decode.reserve("mute", prompt, params, lease_s=30)
        with pytest.raises(TransferError) as info:
            await prefill.prefill("mute", prompt, params, peer, reservation.cached_tokens)
        assert info.value.reason == "timeout"
        held = prefill.engine.block_manager.req_blocks.get("kv-send:mute")
        assert held and len(held) == 4  # 50 tokens in blocks of 16: the decode side might still read them
        for _ in range(100):
            await asyncio.sleep(0.05)
            if "kv-send:mute" not in prefill.engine.block_manager.req_blocks:
                break
        load = await prefill.load(check_integrity=True)
        assert "kv-send:mute" not in prefill.engine.block_manager.req_blocks
        assert load.integrity_error is None
