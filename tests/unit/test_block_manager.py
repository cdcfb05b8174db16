"""BlockManager: allocation, reference counts, chained-hash prefix cache, LRU eviction, integrity. Pure Python."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.engine.block_manager import BlockManager, chain_hash, prefix_block_hashes
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def run_prefill(bm: BlockManager, request: Request) -> None:
    """Allocates the whole prompt (using any prefix hit) and marks it computed, as a finished prefill would."""
    computed = bm.get_computed_blocks(request)
    assert bm.allocate_slots(request, request.num_tokens - computed.num_tokens, computed)
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request, request.num_computed_tokens)


def test_engine_core_logic_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import services.engine.block_manager, services.engine.scheduler, services.engine.request\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_allocation_counts_blocks_and_grows_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    r = req("a", list(range(10)))
    assert bm.allocate_slots(r, 10)
    assert len(bm.block_ids("a")) == 3
    assert bm.num_free_blocks == 7
    assert all(bm.blocks[b].ref_count == 1 for b in bm.block_ids("a"))
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 2)  # positions 10, 11 still fit block 3
    assert len(bm.block_ids("a")) == 3
    r.num_computed_tokens = 12
    assert bm.allocate_slots(r, 1)  # position 12 opens a fourth block
    assert len(bm.block_ids("a")) == 4
    assert bm.num_free_blocks == 6
    bm.check_integrity()
    bm.free("a")
    assert bm.num_free_blocks == 10
    assert all(b.ref_count == 0 for b in bm.blocks)
    bm.check_integrity()


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    assert not bm.allocate_slots(req("big", list(range(13))), 13)
    assert bm.num_free_blocks == 3
    assert "big" not in bm.req_blocks
    assert bm.allocate_slots(req("fits", list(range(12))), 12)
    assert bm.num_free_blocks == 0
    bm.check_integrity()


def test_free_queues_tail_blocks_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.allocate_slots(req("a", list(range(12))), 12)
    held = list(bm.block_ids("a"))
    bm.free("a")
    # The remaining never-used block comes first, then a's blocks tail first.
    assert list(bm.free_queue)[-3:] == held[::-1]


def test_chained_hashes_depend_on_the_whole_prefix() -> None:
    a = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    b = prefix_block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BS)
    assert len(a) == 2 and len(b) == 2  # only full blocks are hashed
    assert a[0] == chain_hash(None, (1, 2, 3, 4))
    assert a[1] == chain_hash(a[0], (5, 6, 7, 8))
    assert a[1] != b[1]  # same block tokens, different parent


def test_prefix_hit_reuses_blocks_and_counts_references() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = req("a", list(range(10)))
    run_prefill(bm, a)
    a_blocks = bm.block_ids("a")
    b = req("b", list(range(8)) + [100, 101, 102])
    computed = bm.get_computed_blocks(b)
    assert computed.num_tokens == 8
    assert computed.block_ids == a_blocks[:2]
    assert bm.allocate_slots(b, b.num_tokens - 8, computed)
    assert bm.block_ids("b")[:2] == a_blocks[:2]
    assert bm.block_ids("b")[2] not in a_blocks
    assert [bm.blocks[i].ref_count for i in a_blocks] == [2, 2, 1]
    bm.check_integrity()
    bm.free("a")
    assert [bm.blocks[i].ref_count for i in a_blocks[:2]] == [1, 1]
    assert all(i not in bm.free_queue for i in a_blocks[:2])
    bm.check_integrity()
    bm.free("b")
    assert bm.num_free_blocks == 16
    bm.check_integrity()


def test_different_first_block_means_no_hit_even_if_later_blocks_match() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    run_prefill(bm, req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    bm.free("a")
    assert bm.get_computed_blocks(req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])).num_tokens == 0
    assert bm.get_computed_blocks(req("c", [1, 2, 3, 4, 0, 6, 7, 8, 9])).num_tokens == 4


def test_cached_free_blocks_are_hit_after_their_owner_finishes() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_prefill(bm, req("a", list(range(9))))
    bm.free("a")
    assert bm.num_free_blocks == 8
    b = req("b", list(range(9)))
    computed = bm.get_computed_blocks(b)
    assert computed.num_tokens == 8
    assert bm.allocate_slots(b, 1, computed)
    assert bm.num_free_blocks == 5
    bm.check_integrity()


def test_fully_cached_prompt_leaves_its_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_prefill(bm, req("a", list(range(8))))
    bm.free("a")
    computed = bm.get_computed_blocks(req("b", list(range(8))))
    assert computed.num_tokens == 4  # the second block holds the last prompt token, whose logits are needed


def test_lru_eviction_takes_the_least_recently_freed_cached_block() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    run_prefill(bm, req("old", [1, 1, 1, 1, 0]))  # one full block, one partial
    bm.free("old")
    run_prefill(bm, req("new", [2, 2, 2, 2, 0]))
    bm.free("new")
    assert len(bm.cached_blocks) == 2
    # The free queue holds the older cached block ahead of the newer one, so it is evicted first.
    assert bm.allocate_slots(req("filler", list(range(100, 112))), 12)
    assert bm.get_computed_blocks(req("o", [1, 1, 1, 1, 0])).num_tokens == 0
    assert bm.get_computed_blocks(req("n", [2, 2, 2, 2, 0])).num_tokens == 4
    assert len(bm.cached_blocks) == 1
    bm.check_integrity()


def test_a_hit_block_is_not_counted_as_free_room() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    run_prefill(bm, req("a", [5, 5, 5, 5, 6]))
    bm.free("a")
    b = req("b", [5, 5, 5, 5] + list(range(9)))  # 13 tokens: 4 blocks, 1 of them a hit
    computed = bm.get_computed_blocks(b)
    assert computed.num_tokens == 4
    assert not bm.allocate_slots(b, 9, computed)
    assert bm.num_free_blocks == 3
    assert "b" not in bm.req_blocks
    bm.check_integrity()


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    run_prefill(bm, req("a", list(range(9))))
    bm.free("a")
    assert bm.get_computed_blocks(req("b", list(range(9)))).num_tokens == 0
    assert bm.cached_blocks == {}


def test_take_stats_reports_queries_and_hits_in_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_prefill(bm, req("a", list(range(9))))
    bm.free("a")
    bm.get_computed_blocks(req("b", list(range(9))))
    assert bm.take_stats() == (18, 8)
    assert bm.take_stats() == (0, 0)


@pytest.mark.parametrize("corruption", ["ref_count", "free_queue", "cached_hash", "double_hold", "leak"])
def test_check_integrity_catches_corruption(corruption: str) -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_prefill(bm, req("a", list(range(9))))
    run_prefill(bm, req("b", list(range(20, 29))))
    bm.free("b")
    bm.check_integrity()
    a0, a1 = bm.block_ids("a")[:2]
    if corruption == "ref_count":
        bm.blocks[a0].ref_count = 2
    elif corruption == "free_queue":
        bm.free_queue[a1] = None
    elif corruption == "cached_hash":
        h = next(iter(bm.cached_blocks))
        bm.cached_blocks[h] = next(b for b in range(8) if bm.blocks[b].hash != h)
    elif corruption == "double_hold":
        bm.req_blocks["a"].append(a0)
    elif corruption == "leak":
        free_block = next(iter(bm.free_queue))
        del bm.free_queue[free_block]
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_double_free_of_a_block_is_refused() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.allocate_slots(req("a", [1, 2]), 2)
    bm.req_blocks["b"] = list(bm.block_ids("a"))  # a forged second owner
    bm.free("a")
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free("b")


def test_hold_keeps_a_finished_requests_blocks_out_of_reuse_until_freed() -> None:
    """KV still being sent from a finished request's blocks: no new request may take them meanwhile."""
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = req("a", list(range(8)))
    run_prefill(bm, a)
    blocks = list(bm.block_ids("a"))
    bm.hold("sending:a", blocks)
    bm.hold("sending:a", blocks)  # again (a later chunk): no second reference
    bm.free("a")
    assert bm.num_used_blocks == 2 and bm.num_free_blocks == 2
    b = req("b", list(range(100, 116)))  # needs all four blocks
    assert not bm.allocate_slots(b, b.num_tokens)
    bm.check_integrity()
    bm.free("sending:a")
    assert bm.num_free_blocks == 4
    assert bm.allocate_slots(b, b.num_tokens)
    bm.check_integrity()
