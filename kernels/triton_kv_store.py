"""Triton store of new K and V into the paged cache by slot mapping (contract: kernels/kv_store.py).

One program per token: slot = block_id * block_size + offset, and a slot of -1 (a padded or
skipped token) writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    slot_ptr,
    num_slots,
    num_heads,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c,
    stride_cb,
    stride_cs,
    stride_ch,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    # -1 means "skip"; a slot past the cache is never written (the reference raises on it).
    if (slot < 0) | (slot >= num_slots):
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src_k = k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = (
        (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    )
    tl.store(kv_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(kv_ptr + stride_c + dst, tl.load(src_v, mask=mask), mask=mask)


def _check(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(
            f"store_kv_triton: kv_layer {tuple(kv_layer.shape)} must be [2, blocks, block_size, heads, dim]"
        )
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != kv_layer.shape[3:]:
        raise ValueError(f"store_kv_triton: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the cache")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError("store_kv_triton: slot_mapping must be int64 [T]")
    if kv_layer.dtype not in _FLOAT_DTYPES or k.dtype != kv_layer.dtype or v.dtype != kv_layer.dtype:
        raise ValueError(
            f"store_kv_triton: k {k.dtype}, v {v.dtype} and kv_layer {kv_layer.dtype} must share one of "
            "float32, float16, bfloat16"
        )
    if any(t.device != kv_layer.device for t in (k, v, slot_mapping)):
        raise ValueError("store_kv_triton: k, v, kv_layer and slot_mapping must be on one device")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_layer.stride(4) != 1 or not slot_mapping.is_contiguous():
        raise ValueError("store_kv_triton: k, v and kv_layer need a unit stride on head_dim; slot_mapping contiguous")


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Same contract as kernels.kv_store.store_kv_ref: writes kv_layer in place. k, v: [T, Hk, D]."""
    _check(k, v, kv_layer, slot_mapping)
    num_tokens, num_heads, head_dim = k.shape
    _, num_blocks, page_size, _, _ = kv_layer.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_layer,
        slot_mapping,
        num_blocks * page_size,
        num_heads,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
