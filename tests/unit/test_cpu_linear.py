"""The CPU projections (kernels/cpu_linear.py: packed, and the few-rows kernel) against nn.Linear, at every row
count a step can have."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels.cpu_native as cpu_native
from kernels.cpu_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 32, 129])
def test_products_match_the_plain_layer(rows: int, bias: bool, threads: int) -> None:
    """Rows 1-4 take the few-rows kernel, more the packed product; 99 inputs and 203 outputs split unevenly."""
    torch.manual_seed(rows)
    linear = nn.Linear(99, 203, bias=bias)
    packed = PackedLinear(linear)
    assert cpu_native.library() is not None
    x = torch.randn(rows, 99)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
            # A non-contiguous view (a split of a fused projection) works as well.
            wide = torch.randn(rows, 198)[:, :99]
            torch.testing.assert_close(packed(wide), linear(wide), rtol=1e-5, atol=1e-5)
            packed.few_rows = 0
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_only_float32_cpu_layers_are_packed() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4)), nn.Linear(4, 4).to(torch.bfloat16))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[2], nn.Linear) and not can_pack(model[2])


@pytest.mark.parametrize(("margin", "few_rows"), [(0.0, 4), (1e9, 0)])
def test_the_few_rows_path_is_chosen_by_timing_both(margin: float, few_rows: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_few_rows keeps the kernel and its row-major weights unless the packed product wins by PACKED_MARGIN;
    either way a step's product is the plain layer's."""
    import kernels.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "PACKED_MARGIN", margin)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=True))
    model = nn.Sequential(*(nn.Linear(a.in_features, a.out_features) for a in plain))
    model.load_state_dict(plain.state_dict())
    pack_linears(model)
    chosen, medians = cpu_linear.choose_few_rows(model)
    assert chosen == few_rows and all(m.few_rows == few_rows for m in model)
    assert list(medians) == ([1, 2, 4] if few_rows else [1]) and all(p > 0 and k > 0 for p, k in medians.values())
    assert all((m.row_major is None) == (few_rows == 0) for m in model)
    for rows in (1, 3):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_the_kept_weights_move_to_one_block_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_few_rows moves the row-major weights it keeps into one block on huge pages (kernels/huge_pages.py),
    each an equal copy starting on a cache line."""
    import kernels.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "PACKED_MARGIN", 0.0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 35), nn.Linear(35, 7))
    weights = [m.weight.detach().clone() for m in model]
    pack_linears(model)
    assert cpu_linear.choose_few_rows(model)[0] == 4
    kept = [m.row_major for m in model]
    assert all(w is not None for w in kept)
    assert len({w.untyped_storage().data_ptr() for w in kept if w is not None}) == 1
    for w, want in zip(kept, weights, strict=True):
        assert w is not None and w.is_contiguous() and w.data_ptr() % 64 == 0
        assert torch.equal(w, want)
