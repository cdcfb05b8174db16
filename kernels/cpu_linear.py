"""The CPU path of the model's projections: weights prepacked once for oneDNN's blocked matrix product.

torch's F.linear on CPU hands float32 products to MKL, which on this AMD host neither uses a second thread nor
keeps the FMA units busy when a step has a few rows. The 17 products of a tiny-preset step, one thread: 9.4 ms
at 4 rows against 3.8 ms packed, 20.7 against 12.2 at 32 rows, 202 against 160 at 512 (a prompt); two threads:
18.9 against 8.1 ms at 32 rows, 124 against 91 at 512 (services/bench/README.md). oneDNN's packed layout is what
torch's own CPU compiler (inductor) uses for the same reason.

A single row (a decode step at batch 1) depends on the CPU. On the Zen 4 host of the earlier measurements MKL's
matrix-vector product over a row-major [in, out] copy streamed the weights on one thread in 3.9 ms against 5.2 ms
packed; on a Zen 5 host the packed product is the faster: a whole batch-1 step took 2.9-3.1 ms against 3.5-3.7
on one thread and 2.3-2.5 against 3.9-4.0 on two (`pdserve bench step --batch-sizes 1`). So `choose_one_row_path`
times both on the model's own layers when the model is readied, at the worker's thread count, and drops the
row-major copy (which doubles the projections' memory) where the packed product is at least 10% faster. Where
torch has no oneDNN, or the dtype is not float32, the layer stays a plain nn.Linear.
"""

from __future__ import annotations

import statistics
import time

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
        # x @ W over a contiguous [in, out] tensor, for single rows where MKL's matrix-vector form streams it
        # faster than the packed product (choose_one_row_path; None: single rows take the packed product too).
        self.row_major: torch.Tensor | None = weight.t().contiguous()
        self.weight_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.row_major is not None:
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


ONE_ROW_ROUNDS = 9  # rounds of each path, interleaved; the medians are compared
ONE_ROW_MARGIN = 0.9  # the packed product must take at most this share of the row-major time to be chosen


@torch.inference_mode()
def choose_one_row_path(model: nn.Module) -> tuple[str, float, float]:
    """Times a single row through every PackedLinear of `model` both ways, at torch's current thread count, and
    drops the row-major copies where the packed product is clearly faster. Returns the path chosen ("packed" or
    "row-major") and the two medians in seconds (packed, row-major); about 50 ms for the tiny preset."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.row_major is not None]
    if not layers:
        return "packed", 0.0, 0.0
    inputs = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    copies = [m.row_major for m in layers]

    def one_pass(use_copy: bool) -> float:
        for m, copy in zip(layers, copies, strict=True):
            m.row_major = copy if use_copy else None
        start = time.perf_counter()
        for m in layers:
            m(inputs[m.in_features])
        return time.perf_counter() - start

    one_pass(False), one_pass(True)  # first calls create the primitives
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(ONE_ROW_ROUNDS):
        for use_copy in (False, True):
            times[use_copy].append(one_pass(use_copy))
    packed_s, row_major_s = statistics.median(times[False]), statistics.median(times[True])
    keep = packed_s > ONE_ROW_MARGIN * row_major_s
    for m, copy in zip(layers, copies, strict=True):
        m.row_major = copy if keep else None
    return ("row-major" if keep else "packed"), packed_s, row_major_s
