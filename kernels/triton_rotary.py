"""Triton rotary embedding, rotate-half layout, cos|sin cache (contract: kernels/rotary.py).

One program per token rotates all its query and key heads: each cache row is read once and
serves every head. Computation is in float32; results are rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.outputs import RotaryOutput

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    token,
    num_heads,
    stride_st,
    stride_sh,
    stride_dt,
    stride_dh,
    cos,
    sin,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HALF)[None, :]
    src = src_ptr + token * stride_st + offs_h[:, None] * stride_sh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + token * stride_dt + offs_h[:, None] * stride_dh + offs_d[None, :]
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    positions_ptr,
    cache_ptr,
    num_q_heads,
    num_k_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cache,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    row = cache_ptr + pos * stride_cache + offs_d
    cos = tl.load(row, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        token,
        num_q_heads,
        stride_qt,
        stride_qh,
        stride_qot,
        stride_qoh,
        cos,
        sin,
        HALF,
        BLOCK_HQ,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        token,
        num_k_heads,
        stride_kt,
        stride_kh,
        stride_kot,
        stride_koh,
        cos,
        sin,
        HALF,
        BLOCK_HK,
        BLOCK_HALF,
    )


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"apply_rotary_triton: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D] alike")
    if q.shape[-1] % 2:
        raise ValueError(f"apply_rotary_triton: head_dim {q.shape[-1]} must be even")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"apply_rotary_triton: positions {tuple(positions.shape)} must be int32/int64 [{q.shape[0]}]")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[-1] != q.shape[-1]:
        raise ValueError("apply_rotary_triton: cos_sin_cache must be [max_positions, head_dim]")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or cos_sin_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"apply_rotary_triton: q {q.dtype} and k {k.dtype} must share, and cos_sin_cache "
            f"{cos_sin_cache.dtype} use, one of float32, float16, bfloat16"
        )
    if any(t.device != q.device for t in (k, positions, cos_sin_cache)):
        raise ValueError("apply_rotary_triton: q, k, positions and cos_sin_cache must be on one device")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin_cache.stride(1) != 1 or not positions.is_contiguous():
        raise ValueError("apply_rotary_triton: q, k and cos_sin_cache need a unit stride on the last dim")


def apply_rotary_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    inplace: bool = False,
) -> RotaryOutput:
    """Same contract and result as kernels.rotary.apply_rotary_ref: new tensors, inputs untouched.

    inplace=True rotates q and k in their own storage and returns them (needs the result dtype
    to be q's dtype). Positions must lie inside the cache; they are not checked on the host.
    """
    _check(q, k, positions, cos_sin_cache)
    out_dtype = torch.promote_types(q.dtype, cos_sin_cache.dtype)
    if inplace:
        if out_dtype != q.dtype:
            raise ValueError(
                f"apply_rotary_triton: in place needs a {q.dtype} cos_sin_cache, got {cos_sin_cache.dtype}"
            )
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=out_dtype, device=k.device)
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return RotaryOutput(q_out, k_out)
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        q_out,
        k_out,
        positions,
        cos_sin_cache,
        num_q_heads,
        k.shape[1],
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos_sin_cache.stride(0),
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return RotaryOutput(q_out, k_out)
