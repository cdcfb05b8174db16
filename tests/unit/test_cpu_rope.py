"""The rotary embedding fused with the KV store (kernels/cpu_rope.c, kernels/rope_store.py) against the torch
reference of each (rotary.apply_rotary_ref, kv_store.store_kv_ref)."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu_native as cpu_native
import kernels.rope_store as rope_store
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


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [5, 150])
def test_a_half_precision_cache_is_stored_rounded(tokens: int, kv_dtype: torch.dtype) -> None:
    """--kv-cache-dtype: the kernel rounds the new K and V into a float16 or bfloat16 cache as torch's .to()
    rounds them (to the nearest even), and rotates q and k in float32 as before."""
    q, k, v, positions, slots, cos_sin, kv_layer = step_tensors(tokens, 2)
    half_cache = kv_layer.to(kv_dtype)
    assert rope_store._fits_kernel(q, k, v, positions, cos_sin, half_cache, slots)  # not the fallback
    want_q, want_k = apply_rotary_ref(q, k, positions, cos_sin)
    want_cache = half_cache.clone()
    store_kv_ref(want_k, v, want_cache, slots)
    got_q, got_k = rotate_and_store(q, k, v, positions, cos_sin, half_cache, slots)
    torch.testing.assert_close(got_q, want_q, **FP32_TOL)
    torch.testing.assert_close(got_k, want_k, **FP32_TOL)
    stored = slots[slots >= 0]
    flat, want_flat = (c.view(2, BLOCKS * BLOCK_SIZE, KV_HEADS, DIM) for c in (half_cache, want_cache))
    assert torch.equal(flat[1], want_flat[1])  # V is not rotated: exactly torch's rounding
    torch.testing.assert_close(flat[0][stored], want_flat[0][stored])  # K: one rounding of float32 values within
    untouched = torch.ones(BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[stored] = False
    assert torch.equal(flat[:, untouched], want_flat[:, untouched])


def test_other_dtypes_take_the_reference_path() -> None:
    """A float64 cache is rotated and stored by the torch functions."""
    q, k, v, positions, slots, cos_sin, kv_layer = step_tensors(3, 1)
    wide_cache = kv_layer.double()
    assert not rope_store._fits_kernel(q, k, v, positions, cos_sin, wide_cache, slots)
    want_q, want_k = apply_rotary_ref(q, k, positions, cos_sin)
    want_cache = wide_cache.clone()
    store_kv_ref(want_k, v, want_cache, slots)
    got_q, got_k = rotate_and_store(q, k, v, positions, cos_sin, wide_cache, slots)
    torch.testing.assert_close(got_q, want_q, **FP32_TOL)
    assert torch.equal(wide_cache, want_cache)
