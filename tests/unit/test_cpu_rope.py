"""The rotary embedding fused with the KV store (kernels/cpu_rope.c, kernels/rope_store.py) against the torch
reference of each (rotary.apply_rotary_ref, kv_store.store_kv_ref)."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu_native as cpu_native
from kernels.kv_store import store_kv_ref
from kernels.rope_store import rotate_and_store
from kernels.rotary import apply_rotary_ref, build_cos_sin_cache
from tests.kernel_cases import FP32_TOL

HEADS, KV_HEADS, DIM, BLOCKS, BLOCK_SIZE, POSITIONS = 6, 2, 64, 12, 16, 256


def step_tensors(tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as views of one fused projection's output (as the model splits it), positions, slots (one of
    them -1: not stored), the cos/sin cache and a layer of the cache holding earlier values."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, generator=gen)
    q, k, v = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
    q, k, v = (t.view(tokens, -1, DIM) for t in (q, k, v))
    positions = torch.randint(0, POSITIONS, (tokens,), generator=gen)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=gen)[:tokens]
    slots[tokens // 2] = -1
    cos_sin = build_cos_sin_cache(DIM, POSITIONS, 10000.0, None, torch.float32)
    kv_layer = torch.randn(2, BLOCKS, BLOCK_SIZE, KV_HEADS, DIM, generator=gen)
    return q, k, v, positions, slots, cos_sin, kv_layer


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 5, 150])
def test_rotate_and_store_matches_the_reference(tokens: int, threads: int) -> None:
    """150 tokens pass THREAD_MIN_TOKENS and split over the threads."""
    assert cpu_native.library() is not None
    q, k, v, positions, slots, cos_sin, kv_layer = step_tensors(tokens, tokens)
    want_q, want_k = apply_rotary_ref(q, k, positions, cos_sin)
    want_cache = kv_layer.clone()
    store_kv_ref(want_k, v, want_cache, slots)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_q, got_k = rotate_and_store(q, k, v, positions, cos_sin, kv_layer, slots)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got_q, want_q, **FP32_TOL)
    torch.testing.assert_close(got_k, want_k, **FP32_TOL)
    torch.testing.assert_close(kv_layer, want_cache, **FP32_TOL)


@pytest.mark.parametrize(("where", "message"), [("position", "position"), ("slot", "slot")])
def test_a_position_or_slot_out_of_range_is_refused_and_nothing_written(where: str, message: str) -> None:
    q, k, v, positions, slots, cos_sin, kv_layer = step_tensors(4, 0)
    if where == "position":
        positions[2] = POSITIONS
    else:
        slots[3] = BLOCKS * BLOCK_SIZE
    q_before, cache_before = q.clone(), kv_layer.clone()
    with pytest.raises(ValueError, match=message):
        rotate_and_store(q, k, v, positions, cos_sin, kv_layer, slots)
    assert torch.equal(q, q_before) and torch.equal(kv_layer, cache_before)


def test_other_dtypes_take_the_reference_path() -> None:
    """A bfloat16 cache (--kv-cache-dtype) is rotated and stored by the torch functions."""
    q, k, v, positions, slots, cos_sin, kv_layer = step_tensors(3, 1)
    half_cache = kv_layer.to(torch.bfloat16)
    want_q, want_k = apply_rotary_ref(q, k, positions, cos_sin)
    want_cache = half_cache.clone()
    store_kv_ref(want_k, v, want_cache, slots)
    got_q, got_k = rotate_and_store(q, k, v, positions, cos_sin, half_cache, slots)
    torch.testing.assert_close(got_q, want_q, **FP32_TOL)
    assert torch.equal(half_cache, want_cache)
