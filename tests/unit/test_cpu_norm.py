"""The CPU RMSNorm kernel (kernels/cpu_norm.c) against the torch reference, with and without the residual add."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu_native as cpu_native
from kernels.rmsnorm import rms_norm, rms_norm_cpu, rms_norm_ref
from tests.kernel_cases import FP32_TOL


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cpu_rms_norm_matches_reference(rows: int, with_residual: bool, threads: int) -> None:
    """300 rows of 512 pass THREAD_MIN_ELEMENTS and split over the threads; x is a row-strided view."""
    assert cpu_native.library() is not None
    hidden = 512 if rows == 300 else 99
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden + 16, generator=gen)[:, :hidden] * 3
    weight = torch.randn(hidden, generator=gen)
    residual = torch.randn(rows, hidden, generator=gen) if with_residual else None
    x_before = x.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = rms_norm_cpu(x, weight, 1e-5, residual)
    finally:
        torch.set_num_threads(before)
    want = rms_norm_ref(x, weight, 1e-5, residual)
    assert got is not None
    torch.testing.assert_close(got.out, want.out, **FP32_TOL)
    torch.testing.assert_close(got.residual, want.residual, **FP32_TOL)
    assert torch.equal(x, x_before)
    assert (got.residual is x) == (residual is None)


def test_cpu_rms_norm_leaves_other_dtypes_and_layouts_to_the_reference() -> None:
    x = torch.randn(3, 32)
    assert rms_norm_cpu(x.bfloat16(), torch.ones(32, dtype=torch.bfloat16), 1e-6) is None
    assert rms_norm_cpu(x, torch.ones(32), 1e-6, torch.randn(3, 32, dtype=torch.float64)) is None
    assert rms_norm_cpu(torch.randn(32, 3).t(), torch.ones(32), 1e-6) is None
    got = rms_norm(x.bfloat16(), torch.ones(32, dtype=torch.bfloat16), 1e-6)
    torch.testing.assert_close(got.out, rms_norm_ref(x.bfloat16(), torch.ones(32, dtype=torch.bfloat16), 1e-6).out)
