"""RMSNorm fused with the residual add.

    residual' = x + residual            (when residual is given)
    out       = residual' / rms(residual') * weight

Returns (out, residual') so the next layer can carry the residual stream without an
extra read and write (the fused add-RMSNorm of TokenWeave).
"""

from __future__ import annotations

import torch

from kernels.outputs import NormOutput


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    """Torch reference: the CPU path and the test oracle. x, residual: [T, H]; weight: [H]."""
    if residual is not None:
        x = x + residual
    residual_out = x
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    out = (xf * torch.rsqrt(variance + eps)).to(x.dtype) * weight
    return NormOutput(out, residual_out)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    """Checks shapes, then runs the Triton kernel on CUDA and the torch reference elsewhere."""
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit [T, H] and [H]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if x.is_cuda:
        from kernels.triton_rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
