"""Triton RMSNorm fused with the residual add (contract: kernels/rmsnorm.py).

One program per row, one pass over it: load x (and residual), write residual' = x + residual,
then out = residual' / rms(residual') * weight, all from registers. Rounding follows the
reference: the sum is rounded to x's dtype before it is normalised, and the normalised row is
rounded to x's dtype before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.outputs import NormOutput

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(
            x_ptr.dtype.element_ty
        )
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * stride_o + offs, normed.to(out_ty) * weight.to(out_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"rms_norm_triton: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit [T, H] and [H]"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm_triton: residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rms_norm_triton: x {x.dtype} and weight {weight.dtype} must be float32, float16 or bfloat16")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"rms_norm_triton: residual {residual.dtype} must have x's dtype {x.dtype}")
    others = (weight,) if residual is None else (weight, residual)
    if any(t.device != x.device for t in others):
        raise ValueError("rms_norm_triton: x, weight and residual must be on one device")
    if x.stride(-1) != 1 or weight.stride(0) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm_triton: x, weight and residual need a unit stride on the hidden dim")


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    """Same contract and result as kernels.rmsnorm.rms_norm_ref. Inputs are left untouched; with no
    residual the returned residual is x itself, as in the reference."""
    _check(x, weight, residual)
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return NormOutput(out, residual_out)
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(num_tokens,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        residual_out,
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        residual_out.stride(0),
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return NormOutput(out, residual_out)
