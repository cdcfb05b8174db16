"""Writes new K and V into the paged cache.

kv_layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (one layer of the cache).
slot_mapping: [T] int64, slot = block_id * block_size + offset; a slot of -1 is skipped.
"""

from __future__ import annotations

import torch


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Torch reference. k, v: [T, Hk, D]."""
    _, num_blocks, block_size, heads, dim = kv_layer.shape
    flat = kv_layer.view(2, num_blocks * block_size, heads, dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_layer.dtype))  # a cache of another dtype: --kv-cache-dtype
    flat[1].index_copy_(0, slot_mapping, v.to(kv_layer.dtype))


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(f"store_kv: kv_layer {tuple(kv_layer.shape)} must be [2, blocks, block_size, heads, dim]")
    if k.shape != v.shape or k.shape[1:] != kv_layer.shape[3:]:
        raise ValueError(f"store_kv: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the cache")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError("store_kv: slot_mapping must be int64 [T]")
    if kv_layer.is_cuda:
        from kernels.triton_kv_store import store_kv_triton

        return store_kv_triton(k, v, kv_layer, slot_mapping)
    return store_kv_ref(k, v, kv_layer, slot_mapping)
