"""The CPU path of the model's projections: oneDNN's packed product, and a kernel of ours for a few rows.

torch's F.linear on CPU hands float32 products to MKL, which on this AMD host neither uses a second thread nor
keeps the FMA units busy when a step has a few rows. The 17 products of a tiny-preset step, one thread: 9.4 ms
at 4 rows against 3.8 ms packed, 20.7 against 12.2 at 32 rows, 202 against 160 at 512 (a prompt); two threads:
18.9 against 8.1 ms at 32 rows, 124 against 91 at 512 (services/bench/README.md). oneDNN's packed layout is what
torch's own CPU compiler (inductor) uses for the same reason.

A decode step of 1 to 4 rows only streams the weights, and there oneDNN's packed product runs well short of the
memory's bandwidth. The few-rows kernel (cpu_rows.c) reads each weight row once, in nn.Linear's own layout, for
every input row at once. It needs that layout besides the packed one, which doubles the projections' memory, so
`choose_few_rows` times both on the model's own layers when the model is readied, at the worker's thread count,
and keeps the kernel (and its copy of the weights) for the row counts where the packed product is not at least
10% faster. Where torch has no oneDNN, or the dtype is not float32, the layer stays a plain nn.Linear.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from kernels.cpu_native import library
from kernels.huge_pages import gather_on_huge_pages

PACK_ROWS_HINT = 32  # the batch size oneDNN tunes the layout for: best from 2 to 512 rows on this host
FEW_ROWS_MAX = 4  # the most rows the few-rows kernel takes (cpu_rows.c)


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is held in oneDNN's packed layout, and row-major for the few-rows kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        # [out, in] for the few-rows kernel, which takes steps of up to `few_rows` rows (choose_few_rows; None and
        # 0: every step takes the packed product).
        self.row_major: torch.Tensor | None = weight
        self.few_rows = FEW_ROWS_MAX
        self.weight_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        fits = x.dim() == 2 and x.dtype == torch.float32 and x.stride(-1) == 1
        if fits and 0 < rows <= self.few_rows and self.row_major is not None:
            so = library()
            if so is not None:
                y = torch.empty(rows, self.out_features)
                so.pd_few_rows(self.row_major.data_ptr(), self.out_features, self.in_features, x.data_ptr(),
                               x.stride(0), rows, y.data_ptr(), y.stride(0), torch.get_num_threads())
                return y if self.bias is None else y.add_(self.bias)
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


CHOICE_ROWS = (1, 2, 4)  # the row counts choose_few_rows times
CHOICE_ROUNDS = 5  # rounds of each path at each row count, interleaved; the medians are compared
CHOICE_BYTES = 2**26  # the first layers up to this many weight bytes are timed: more than a CPU's last cache
PACKED_MARGIN = 0.9  # the packed product must take at most this share of the kernel's time to be chosen


@torch.inference_mode()
def choose_few_rows(model: nn.Module) -> tuple[int, dict[int, tuple[float, float]]]:
    """Times the projections of `model` both ways at each of CHOICE_ROWS rows, at torch's current thread count,
    and sets how many rows each layer's few-rows kernel takes: up to the last count where the packed product was
    not clearly faster, nor at any count below. Layers keep their row-major weights only for a kernel they use.
    Returns that row count (0: none) and, per count timed, the medians in seconds of one pass (packed, kernel)
    over the layers timed; about 40 ms for the tiny preset."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.row_major is not None]
    timed: list[PackedLinear] = []
    timed_bytes = 0
    for m in layers:
        if timed_bytes >= CHOICE_BYTES:
            break
        timed.append(m)
        timed_bytes += m.weight_bytes
    few_rows, medians = 0, {}
    if timed and library() is not None:
        for rows in CHOICE_ROWS:
            packed_s, kernel_s = _time_both(timed, rows)
            medians[rows] = (packed_s, kernel_s)
            if packed_s <= PACKED_MARGIN * kernel_s:
                break
            few_rows = rows
    for m in layers:
        m.few_rows = few_rows
        if not few_rows:
            m.row_major = None
    # The kernel streams the weights it keeps from memory: one block on huge pages spares it a TLB miss every 4 KiB.
    moved = iter(gather_on_huge_pages([m.row_major for m in layers if m.row_major is not None]))
    for m in layers:
        if m.row_major is not None:
            m.row_major = next(moved)
    return few_rows, medians


def _time_both(layers: list[PackedLinear], rows: int) -> tuple[float, float]:
    inputs = {m.in_features: torch.randn(rows, m.in_features) for m in layers}

    def one_pass(kernel_rows: int) -> float:
        for m in layers:
            m.few_rows = kernel_rows
        start = time.perf_counter()
        for m in layers:
            m(inputs[m.in_features])
        return time.perf_counter() - start

    one_pass(0), one_pass(rows)  # first calls create oneDNN's primitives
    times: dict[int, list[float]] = {0: [], rows: []}
    for _ in range(CHOICE_ROUNDS):
        for kernel_rows in times:
            times[kernel_rows].append(one_pass(kernel_rows))
    return statistics.median(times[0]), statistics.median(times[rows])
