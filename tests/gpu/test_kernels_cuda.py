"""The compiled Triton kernels against their torch references in bfloat16 and float16 on CUDA.

Skipped without a CUDA device, and under TRITON_INTERPRET=1 (that would test the interpreter,
which tests/unit/test_kernels.py already does). Also checks that the public wrappers dispatch to
Triton on CUDA. References for attention run in float32 on the same (rounded) inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.attention import paged_attention, paged_attention_ref
from kernels.kv_store import store_kv, store_kv_ref
from kernels.rmsnorm import rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache
from tests.kernel_cases import attention_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="tests compiled Triton, not the interpreter"),
]
DTYPES = [torch.bfloat16, torch.float16]


ATTENTION_CASES = {
    "mixed_gqa": ([1, 9, 1, 23, 0, 1, 300], [37, 30, 1, 23, 5, 16, 1000], 32, 8, 128, 16),
    "mha_long_chunk": ([70, 1, 129], [85, 50, 129], 8, 8, 64, 16),
    "decode_long_context": ([1] * 33, [4099 - 97 * i for i in range(33)], 32, 4, 128, 16),
    "odd_group_page5": ([3, 1, 12], [10, 11, 12], 6, 2, 64, 5),
    "mqa_page32": ([17, 1, 64], [40, 33, 200], 16, 1, 64, 32),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_matches_reference(name: str, dtype: torch.dtype) -> None:
    from kernels.triton_attention import paged_attention_triton

    case = attention_case(*ATTENTION_CASES[name], device="cuda", dtype=dtype)
    out = paged_attention_triton(*case)
    assert out.dtype == dtype
    want = paged_attention_ref(case.q.float(), case.kv_layer.float(), *case[2:])
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(paged_attention(*case), out, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool) -> None:
    from kernels.triton_rmsnorm import rms_norm_triton

    x = torch.randn(37, 4096, device="cuda").to(dtype) * 3
    weight = torch.randn(4096, device="cuda").to(dtype)
    residual = torch.randn(37, 4096, device="cuda").to(dtype) if with_residual else None
    got, want = rms_norm_triton(x, weight, 1e-5, residual), rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(got.residual, want.residual)
    torch.testing.assert_close(got.out, want.out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5, residual).out, got.out, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_matches_reference(dtype: torch.dtype, inplace: bool) -> None:
    from kernels.triton_rotary import apply_rotary_triton

    qkv = torch.randn(67, (32 + 16) * 128, device="cuda").to(dtype)
    q, k = qkv[:, : 32 * 128].view(67, 32, 128), qkv[:, 32 * 128 : 40 * 128].view(67, 8, 128)
    positions = torch.randint(0, 8192, (67,), device="cuda")
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cache = build_cos_sin_cache(128, 8192, 500000.0, scaling, dtype).cuda()
    want = apply_rotary_ref(q, k, positions, cache)
    torch.testing.assert_close(apply_rotary(q, k, positions, cache).q, want.q, atol=2e-2, rtol=2e-2)
    got = apply_rotary_triton(q, k, positions, cache, inplace=inplace)
    torch.testing.assert_close(got.q, want.q, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.k, want.k, atol=2e-2, rtol=2e-2)
    assert (got.q is q) == inplace


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_reference(dtype: torch.dtype) -> None:
    from kernels.triton_kv_store import store_kv_triton

    cache = torch.randn(2, 64, 16, 8, 128, device="cuda").to(dtype)
    k = torch.randn(300, 10, 128, device="cuda").to(dtype)[:, 1:9]
    v = torch.randn(8, 300, 128, device="cuda").to(dtype).transpose(0, 1)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    want = cache.clone()
    store_kv_ref(k, v, want, slots)
    got = cache.clone()
    store_kv_triton(k, v, got, slots)
    assert torch.equal(got, want)
    store_kv(k, v, cache, slots)
    assert torch.equal(cache, want)
