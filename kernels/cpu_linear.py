"""The CPU path of the model's projections: weights prepacked once for oneDNN's blocked matrix product.

torch's F.linear on CPU hands float32 products to MKL, which on this AMD host neither uses a second thread nor
keeps the FMA units busy when a decode step has a few rows: a decode step of the tiny model spends 9.4 ms in
products at batch 4 on one thread, 3.8 ms packed; at batch 32 on two threads 18.9 ms against 8.1 ms
(services/bench/README.md). oneDNN's packed layout is what torch's own CPU compiler (inductor) uses for the
same reason.

A packed weight reads worse than a plain row-major one at a single row on a single thread (5.2 ms against
3.9 ms for the tiny model's step), so with one thread a layer also keeps that form for steps of one or two rows.
Where torch has no oneDNN, or the dtype is not float32, the layer stays a plain nn.Linear.
"""

from __future__ import annotations

import torch
from torch import nn

PACK_ROWS_HINT = 32  # the batch size oneDNN tunes the layout for: best from 2 to 512 rows on this host
ROW_MAJOR_MAX_ROWS = 2  # with one thread, products of up to this many rows read the row-major form instead


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is held in oneDNN's packed layout (and, with one thread, row-major too)."""

    def __init__(self, linear: nn.Linear, keep_row_major: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        # x @ W over a contiguous [in, out] tensor: MKL's matrix-vector form streams it fastest at one row.
        self.row_major = weight.t().contiguous() if keep_row_major else None
        self.weight_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_major is not None and x.shape[0] <= ROW_MAJOR_MAX_ROWS:
            out = x @ self.row_major
            return out if self.bias is None else out + self.bias
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def can_pack(linear: nn.Linear) -> bool:
    return (torch.backends.mkldnn.is_available() and linear.weight.dtype == torch.float32
            and linear.weight.device.type == "cpu")


def pack_linears(model: nn.Module) -> int:
    """Replaces every float32 nn.Linear under `model` by a PackedLinear; returns how many."""
    keep_row_major = torch.get_num_threads() == 1
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and can_pack(child)]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, keep_row_major))
    return len(swaps)
