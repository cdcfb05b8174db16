"""SwiGLU's gate (kernels/cpu_swiglu.c, kernels/activation.py) against the torch reference."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu_native as cpu_native
from kernels.activation import silu_and_mul, silu_and_mul_ref
from tests.kernel_cases import FP32_TOL


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 3, 200])
def test_silu_and_mul_matches_the_reference(tokens: int, threads: int) -> None:
    """200 tokens of 2 x 768 pass THREAD_MIN_ELEMENTS and split over the threads; x is a row-strided view, and
    its gates span large negative and positive values."""
    assert cpu_native.library() is not None
    gen = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, 1536 + 32, generator=gen) * 8)[:, :1536]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = silu_and_mul(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, silu_and_mul_ref(x), **FP32_TOL)


def test_silu_and_mul_refuses_an_odd_width_and_leaves_other_dtypes_to_torch() -> None:
    with pytest.raises(ValueError, match="must be"):
        silu_and_mul(torch.randn(2, 5))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))
