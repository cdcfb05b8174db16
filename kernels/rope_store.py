"""A step's new q and k rotated, and its new K and V stored into the paged cache: one C pass on the CPU
(cpu_rope.c) where the tensors are float32 and the cache float32, float16 or bfloat16, else the rotary embedding
(rotary.py) and then the store (kv_store.py)."""

from __future__ import annotations

import torch

from kernels.cpu_native import KV_TYPES, library
from kernels.kv_store import store_kv
from kernels.outputs import RotaryOutput
from kernels.rotary import apply_rotary

THREAD_MIN_TOKENS = 64  # fewer tokens than this take the calling thread alone: a decode step's rows


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> RotaryOutput:
    """q: [T, Hq, D], k and v: [T, Hk, D], positions and slot_mapping: [T] int64 (a slot of -1 is not stored);
    kv_layer: [2, num_blocks, block_size, Hk, D]. Returns the rotated q and k (in place on the C path)."""
    so = library() if _fits_kernel(q, k, v, positions, cos_sin_cache, kv_layer, slot_mapping) else None
    if so is None:
        q, k = apply_rotary(q, k, positions, cos_sin_cache)
        store_kv(k, v, kv_layer, slot_mapping)
        return RotaryOutput(q, k)
    tokens, q_heads, dim = q.shape
    _, num_blocks, block_size, kv_heads, _ = kv_layer.shape
    failed = so.pd_rope_store(
        q.data_ptr(), q.stride(0), q.stride(1), q_heads, k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), kv_heads, dim, positions.data_ptr(), cos_sin_cache.data_ptr(),
        cos_sin_cache.shape[0], kv_layer.data_ptr(), KV_TYPES[kv_layer.dtype], num_blocks * block_size,
        slot_mapping.data_ptr(), tokens,
        torch.get_num_threads() if tokens >= THREAD_MIN_TOKENS else 1,
    )  # fmt: skip
    if failed == 1:
        positions_held = cos_sin_cache.shape[0]
        raise ValueError(f"rotate_and_store: a position lies outside the cos/sin cache's {positions_held} positions")
    if failed == 2:
        raise ValueError(f"rotate_and_store: a slot lies outside the cache's {num_blocks * block_size} slots")
    return RotaryOutput(q, k)


def _fits_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Whether the C kernel takes these tensors: float32 on the CPU (the cache of a type it stores), heads
    contiguous, shapes that agree."""
    tensors = (q, k, v, cos_sin_cache)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if kv_layer.device.type != "cpu" or kv_layer.dtype not in KV_TYPES:
        return False
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        return False
    tokens, _, dim = q.shape
    return (k.shape[0] == tokens and k.shape[2] == dim and dim % 2 == 0 and kv_layer.shape[3:] == k.shape[1:]
            and all(t.stride(-1) == 1 for t in (q, k, v)) and kv_layer.is_contiguous()
            and cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == dim and cos_sin_cache.is_contiguous()
            and all(t.shape == (tokens,) and t.dtype == torch.int64 and t.is_contiguous()
                    for t in (positions, slot_mapping)))
