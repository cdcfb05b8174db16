"""The prepacked CPU projections (kernels/cpu_linear.py) against nn.Linear, at every row count a step can have."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.cpu_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 7, 32, 129])
def test_packed_products_match_the_plain_layer(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        # A non-contiguous view (a split of a fused projection) works as well.
        wide = torch.randn(rows, 192)[:, :96]
        torch.testing.assert_close(packed(wide), linear(wide), rtol=1e-5, atol=1e-5)


def test_only_float32_cpu_layers_are_packed() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4)), nn.Linear(4, 4).to(torch.bfloat16))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[2], nn.Linear) and not can_pack(model[2])


@pytest.mark.parametrize(("margin", "path"), [(0.0, "row-major"), (1e9, "packed")])
def test_the_single_row_path_is_chosen_by_timing_both(margin: float, path: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """choose_one_row_path keeps the row-major copies unless the packed product wins by ONE_ROW_MARGIN; either
    way a single row's product is the plain layer's."""
    import kernels.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "ONE_ROW_MARGIN", margin)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=True))
    model = nn.Sequential(*(nn.Linear(a.in_features, a.out_features) for a in plain))
    model.load_state_dict(plain.state_dict())
    pack_linears(model)
    chosen, packed_s, row_major_s = cpu_linear.choose_one_row_path(model)
    assert chosen == path and packed_s > 0 and row_major_s > 0
    assert all((m.row_major is None) == (path == "packed") for m in model)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
