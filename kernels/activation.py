"""SwiGLU's gate over the fused gate and up projection: silu(x[..., :d]) * x[..., d:], in one C pass for float32
on the CPU (cpu_swiglu.c), else in torch."""

from __future__ import annotations

import torch
from torch.nn import functional

from kernels.cpu_native import THREAD_MIN_ELEMENTS, library


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference: the fallback and the test oracle. x: [T, 2d] -> [T, d]."""
    gate, up = x.chunk(2, dim=-1)
    return functional.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: x {tuple(x.shape)} must be [T, 2d]")
    so = library() if x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1 else None
    if so is None:
        return silu_and_mul_ref(x)
    tokens, half = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, half)
    threads = torch.get_num_threads() if tokens * half >= THREAD_MIN_ELEMENTS else 1
    so.pd_silu_mul(x.data_ptr(), x.stride(0), tokens, half, out.data_ptr(), out.stride(0), threads)
    return out
