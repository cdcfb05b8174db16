"""The named results of the kernel wrappers, in a leaf module: the torch reference and the Triton
kernel of one operation both return them, and neither imports the other's module to get the type."""

from __future__ import annotations

from typing import NamedTuple

import torch


class NormOutput(NamedTuple):
    """rms_norm: the normalised rows, and the residual stream after the add (the next layer's input)."""

    out: torch.Tensor
    residual: torch.Tensor


class RotaryOutput(NamedTuple):
    """apply_rotary: the rotated queries and keys."""

    q: torch.Tensor
    k: torch.Tensor
