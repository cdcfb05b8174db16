"""Rotary position embedding (rotate-half layout, as Hugging Face Llama): default, linear, llama3 and yarn RoPE.

cos_sin_cache: [max_positions, head_dim] holding cos in the first half and sin in the
second half of the last dimension (each of size head_dim // 2).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from kernels.outputs import RotaryOutput


class RopeFrequencies(NamedTuple):
    inv_freq: torch.Tensor  # [head_dim // 2] float32
    attention_scaling: float  # multiplies cos and sin (YaRN's mscale); 1.0 for the other types


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> RopeFrequencies:
    """Inverse frequencies of `scaling["rope_type"]` (default when `scaling` is None), computed as
    transformers 5 computes them, operation for operation, so that float32 tables agree bit for bit."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return RopeFrequencies(inv_freq, 1.0)


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, theta: float, old_len: float) -> float:
    """The (fractional) dimension whose wavelength fits `rotations` times into the original context."""
    return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def _yarn(dim: int, theta: float, scaling: dict[str, Any]) -> RopeFrequencies:
    """YaRN: interpolate (divide by `factor`) the dimensions that rotate fewer than `beta_slow` times over the
    original context, keep those that rotate more than `beta_fast` times, ramp linearly between; cos and sin
    are scaled by the attention factor. Missing options default as in transformers."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    low = _yarn_correction_dim(beta_fast, dim, theta, old_len)
    high = _yarn_correction_dim(beta_slow, dim, theta, old_len)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the original frequency is kept (extrapolated), 0 where it is divided by factor
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return RopeFrequencies(inv_freq, float(attention))


def build_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None, dtype: torch.dtype
) -> torch.Tensor:
    """[max_positions, head_dim]: cos then sin of every position's angles, times the attention scaling."""
    inv_freq, attention_scaling = rope_frequencies(head_dim, theta, scaling)
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return torch.cat([cos, sin], dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> RotaryOutput:
    """Torch reference. q: [T, Hq, D], k: [T, Hk, D], positions: [T] int64."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    return RotaryOutput(_rotate(q, cos, sin), _rotate(k, cos, sin))


def apply_rotary_cpu(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> RotaryOutput:
    """The CPU path: the reference's arithmetic over q and k as one [T, Hq + Hk, D] tensor, half the small
    ops of rotating each (at batch 1 every op costs microseconds whatever its size)."""
    qk = _rotate_cpu(torch.cat([q, k], dim=1), cos_sin_cache[positions])
    return RotaryOutput(qk[:, : q.shape[1]], qk[:, q.shape[1] :])


def _rotate_cpu(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return _rotate(x, cs[:, None, :half], cs[:, None, half:])


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> RotaryOutput:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D] alike")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"apply_rotary: positions {tuple(positions.shape)} must be [{q.shape[0]}]")
    if cos_sin_cache.shape[-1] != q.shape[-1]:
        raise ValueError("apply_rotary: cos_sin_cache last dimension must equal head_dim")
    if q.is_cuda:
        from kernels.triton_rotary import apply_rotary_triton

        return apply_rotary_triton(q, k, positions, cos_sin_cache)
    return apply_rotary_cpu(q, k, positions, cos_sin_cache)
