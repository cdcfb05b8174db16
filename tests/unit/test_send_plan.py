"""The prefill worker's send planning (services/prefill/send_plan.py): which positions of which request go where."""

from __future__ import annotations

import pytest

from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledRequest
from services.prefill.send_plan import (
    BatchRows,
    CacheBlocks,
    CachedSlots,
    PlannedSend,
    SendPlan,
    plan_from_batch,
    plan_from_cache,
)
from services.transfer.sender import MAX_SOURCE_BLOCKS

BS = 4  # block size


def chunk(request_id: str, start_pos: int, n: int, block_ids: list[int]) -> ScheduledRequest:
    """A prefill chunk: positions [start_pos, start_pos + n) of the request, in `block_ids`."""
    return ScheduledRequest(request_id, list(range(n)), start_pos, block_ids, False, SamplingParams(), 0)


def plan(token_start: int, peer: str = "decode:1") -> SendPlan:
    return SendPlan(peer, token_start, token_start)


def slots(block_ids: list[int], start: int, end: int) -> list[int]:
    return [block_ids[p // BS] * BS + p % BS for p in range(start, end)]


BLOCKS = [7, 3, 9, 1, 12, 5, 8, 2]  # a request's blocks, scattered; room for 32 positions


def test_a_cached_prefix_goes_with_the_first_chunk() -> None:
    """This side had positions [0, 12) cached: they go from the KV cache, the chunk from the batch."""
    plans = {"r": plan(0)}
    sends = plan_from_batch([chunk("r", 12, 10, BLOCKS)], plans, BS)
    assert sends == [
        PlannedSend("r", "decode:1", 0, 12, CachedSlots(slots(BLOCKS, 0, 12))),
        PlannedSend("r", "decode:1", 12, 10, BatchRows(0, 10)),
    ]
    assert plans["r"].sent_until == 22
    plans = {"r": plan(0)}
    assert plan_from_cache([chunk("r", 12, 10, BLOCKS)], plans, BS, MAX_SOURCE_BLOCKS) == [
        PlannedSend("r", "decode:1", 0, 22, CacheBlocks(BLOCKS))
    ]
    assert plans["r"].sent_until == 22


def test_token_start_skips_what_the_decode_side_has_cached() -> None:
    # The decode side has [0, 16), this side [0, 12): only [12, 16) of the prefix, then the chunk from row 0.
    plans = {"r": plan(16)}
    assert plan_from_batch([chunk("r", 12, 10, BLOCKS)], plans, BS) == [
        PlannedSend("r", "decode:1", 16, 6, BatchRows(4, 10))
    ]
    # The decode side has less than this side: the gap [8, 12) comes from the KV cache.
    assert plan_from_batch([chunk("r", 12, 10, BLOCKS)], {"r": plan(8)}, BS)[0] == PlannedSend(
        "r", "decode:1", 8, 4, CachedSlots(slots(BLOCKS, 8, 12))
    )
    assert plan_from_cache([chunk("r", 12, 10, BLOCKS)], {"r": plan(16)}, BS, MAX_SOURCE_BLOCKS) == [
        PlannedSend("r", "decode:1", 16, 6, CacheBlocks(BLOCKS))
    ]
    # A chunk wholly below token_start sends nothing, and the next chunk starts at token_start.
    plans = {"r": plan(20)}
    assert plan_from_batch([chunk("r", 0, 10, BLOCKS)], plans, BS) == []
    assert plan_from_batch([chunk("r", 10, 15, BLOCKS)], plans, BS) == [
        PlannedSend("r", "decode:1", 20, 5, BatchRows(10, 15))
    ]
    plans = {"r": plan(20)}
    assert plan_from_cache([chunk("r", 0, 10, BLOCKS)], plans, BS, MAX_SOURCE_BLOCKS) == []
    assert plans["r"].sent_until == 10
    assert [s.token_start for s in plan_from_cache([chunk("r", 10, 15, BLOCKS)], plans, BS, MAX_SOURCE_BLOCKS)] == [20]


def test_chunked_prefill_sends_each_chunk_once_at_its_rows() -> None:
    """A 30-token prompt in chunks of 12, batched behind another request's decode row each step."""
    plans = {"r": plan(0)}
    got = []
    for start in (0, 12, 24):
        n = min(12, 30 - start)
        step = [chunk("other", 40, 1, [0] * 11), chunk("r", start, n, BLOCKS)]
        got += plan_from_batch(step, plans, BS)
    assert got == [
        PlannedSend("r", "decode:1", 0, 12, BatchRows(1, 13)),
        PlannedSend("r", "decode:1", 12, 12, BatchRows(1, 13)),
        PlannedSend("r", "decode:1", 24, 6, BatchRows(1, 7)),
    ]
    plans = {"r": plan(0)}
    got = [s for start in (0, 12, 24) for s in plan_from_cache([chunk("r", start, 12, BLOCKS)], plans, BS, 64)]
    assert [(s.token_start, s.num_tokens) for s in got] == [(0, 12), (12, 12), (24, 12)]


def test_sends_from_the_cache_span_at_most_max_source_blocks() -> None:
    table = list(range(100))
    sends = plan_from_cache([chunk("r", 2, 60, table)], {"r": plan(2)}, BS, 3)
    assert [(s.token_start, s.num_tokens) for s in sends] == [
        (2, 8),
        (10, 8),
        (18, 8),
        (26, 8),
        (34, 8),
        (42, 8),
        (50, 8),
        (58, 4),
    ]
    for s in sends:
        first, last = s.token_start // BS, (s.token_start + s.num_tokens - 1) // BS
        assert last - first + 1 <= 3
    # With the real limit: a long chunk starting mid-block, split so that no send spans more.
    sends = plan_from_cache([chunk("r", 5, 5000, list(range(1300)))], {"r": plan(5)}, BS, MAX_SOURCE_BLOCKS)
    assert sum(s.num_tokens for s in sends) == 5000 and len(sends) == 5
    for s in sends:
        assert (s.token_start + s.num_tokens - 1) // BS - s.token_start // BS + 1 <= MAX_SOURCE_BLOCKS
    with pytest.raises(ValueError, match="max_source_blocks"):
        plan_from_cache([chunk("r", 0, 4, [0])], {"r": plan(0)}, BS, 1)


def test_requests_without_a_plan_are_not_sent_but_keep_their_rows() -> None:
    plans = {"b": plan(0, "decode:2")}
    step = [chunk("a", 0, 5, [0, 1]), chunk("b", 0, 6, [2, 3]), chunk("c", 8, 1, [4, 5, 6])]
    assert plan_from_batch(step, plans, BS) == [PlannedSend("b", "decode:2", 0, 6, BatchRows(5, 11))]
    assert plan_from_cache(step, plans, BS, MAX_SOURCE_BLOCKS) == []  # b's positions were queued just above
    assert plan_from_cache(step, {"b": plan(0, "decode:2")}, BS, MAX_SOURCE_BLOCKS) == [
        PlannedSend("b", "decode:2", 0, 6, CacheBlocks([2, 3]))
    ]
    assert plan_from_batch(step, {}, BS) == [] and plan_from_cache(step, {}, BS, MAX_SOURCE_BLOCKS) == []
