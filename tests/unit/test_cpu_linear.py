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
