"""RMSNorm fused with the residual add.

    residual' = x + residual            (when residual is given)
    out       = residual' / rms(residual') * weight

Returns (out, residual') so the next layer can carry the residual stream without an
extra read and write (the fused add-RMSNorm of TokenWeave). On CUDA a Triton kernel runs it, on the CPU a C
kernel for float32 (cpu_norm.c), elsewhere the torch reference.
"""

from __future__ import annotations

import torch

from kernels.cpu_native import THREAD_MIN_ELEMENTS, library
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


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput | None:
    """The C kernel on float32 CPU rows; None (nothing done) where it cannot take these tensors."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    so = library()
    if so is None or any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors):
        return None
    rows, hidden = x.shape
    out = torch.empty(rows, hidden)
    total = x if residual is None else torch.empty(rows, hidden)  # the kernel writes the sum only with a residual
    threads = torch.get_num_threads() if rows * hidden >= THREAD_MIN_ELEMENTS else 1
    so.pd_rms_norm(x.data_ptr(), x.stride(0), 0 if residual is None else residual.data_ptr(),
                   0 if residual is None else residual.stride(0), weight.data_ptr(), rows, hidden, eps,
                   total.data_ptr(), total.stride(0), out.data_ptr(), out.stride(0), threads)
    return NormOutput(out, total)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    """Checks shapes, then runs the Triton kernel on CUDA, the C kernel on the CPU, else the torch reference."""
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit [T, H] and [H]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if x.is_cuda:
        from kernels.triton_rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    done = rms_norm_cpu(x, weight, eps, residual)
    return done if done is not None else rms_norm_ref(x, weight, eps, residual)
