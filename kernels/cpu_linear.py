"""The CPU path of the model's projections: weights prepacked once for oneDNN's blocked matrix product.

torch's F.linear on CPU hands float32 products to MKL, which on this AMD host neither uses a second thread nor
keeps the FMA units busy when a step has a few rows. The 17 products of a tiny-preset step, one thread: 9.4 ms
at 4 rows against 3.8 ms packed, 20.7 against 12.2 at 32 rows, 202 against 160 at 512 (a prompt); two threads:
18.9 against 8.1 ms at 32 rows, 124 against 91 at 512 (services/bench/README.md). oneDNN's packed layout is what
torch's own CPU compiler (inductor) uses for the same reason.

A single row (a decode step at batch 1) is the exception: MKL's matrix-vector product over a row-major [in, out]
copy streams the weights on one thread in 3.9 ms against 5.2 ms packed, and a packed product on two threads,
2.6 ms alone, waits at its OpenMP barrier whenever the router or Ray takes the other core: served one request at
a time, colocated on 2 cores, TPOT p50 was 7.5-8.4 ms packed against 5.9-6.1 ms with the copy. So each layer
also keeps that copy, which doubles the projections' memory. Where torch has no oneDNN, or the dtype is not
float32, the layer stays a plain nn.Linear.
"""

from __future__ import annotations

import torch
from torch import nn

PACK_ROWS_HINT = 32  # the batch size oneDNN tunes the layout for: best from 2 to 512 rows on this host


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is held in oneDNN's packed layout, and row-major for single rows."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        # x @ W over a contiguous [in, out] tensor: MKL's matrix-vector form streams it fastest at one row.
        self.row_major = weight.t().contiguous()
        self.weight_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            out = x @ self.row_major
            return out if self.bias is None else out + self.bias
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def can_pack(linear: nn.Linear) -> bool:
    return (torch.backends.mkldnn.is_available() and linear.weight.dtype == torch.float32
            and linear.weight.device.type == "cpu")


def pack_linears(model: nn.Module) -> int:
    """Replaces every float32 nn.Linear under `model` by a PackedLinear; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and can_pack(child)]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
