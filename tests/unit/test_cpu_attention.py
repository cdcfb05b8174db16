"""The CPU attention kernels against the torch reference, in place over the paged cache on one and two threads:
decodes (kernels/cpu_decode.c) and prompt chunks (kernels/cpu_prefill.c), over a float32, float16 or bfloat16
cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.cpu_attention as cpu_attention
from kernels.attention import paged_attention_cpu, paged_attention_ref
from kernels.kv_store import store_kv
from tests.kernel_cases import ATTENTION_CASES, FP32_TOL, attention_case


@pytest.fixture
def native_kernel() -> None:
    """The in-place kernel must be the one under test: a fallback to the reference would pass anything.
    make setup builds it (it needs a C compiler, as the KV data path does)."""
    assert cpu_attention.library() is not None


@pytest.mark.usefixtures("native_kernel")
def test_loading_the_cpu_kernel_keeps_subnormal_floats() -> None:
    """A library linked with -ffast-math sets its loader's floating-point mode to flush subnormals to zero."""
    script = ("import torch, kernels.cpu_native as k; x = torch.tensor([1e-40]); k.library(); "
              "print((x * 1).item() > 0, 2.0**-1070 > 0)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[2])
    assert done.stdout.split() == ["True", "True"]


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_cpu_attention_in_place_matches_reference(name: str, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Unused table entries point at other sequences' pages and page tails hold NaN (attention_case).
    monkeypatch.setattr(cpu_attention, "THREAD_MIN_BYTES", 0 if threads > 1 else 1 << 62)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = attention_case(*ATTENTION_CASES[name], seed=threads)
        out = paged_attention_cpu(*case)
    finally:
        torch.set_num_threads(before)
    assert not out.isnan().any()
    torch.testing.assert_close(out, paged_attention_ref(*case), **FP32_TOL)


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["mixed_gqa", "decode_long_context", "uneven_decodes"])
def test_cpu_attention_over_a_half_precision_cache(name: str, kv_dtype: torch.dtype, threads: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--kv-cache-dtype: the kernel widens each K and V row of a float16 or bfloat16 cache to float32, so it
    matches the reference over the same values in a float32 cache."""
    monkeypatch.setattr(cpu_attention, "THREAD_MIN_BYTES", 0 if threads > 1 else 1 << 62)
    case = attention_case(*ATTENTION_CASES[name], seed=5)
    half = case._replace(kv_layer=case.kv_layer.to(kv_dtype))
    widened = case._replace(kv_layer=half.kv_layer.float())
    starts = case.query_start_loc.tolist()
    decode_lens = [n for b, n in enumerate(case.context_lens.tolist()) if starts[b + 1] - starts[b] == 1]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu_attention.decode_in_place(*half, torch.zeros_like(case.q), decode_lens)  # not the fallback
        out = paged_attention_cpu(*half)
    finally:
        torch.set_num_threads(before)
    assert not out.isnan().any()
    torch.testing.assert_close(out, paged_attention_ref(*widened), **FP32_TOL)
    torch.testing.assert_close(paged_attention_ref(*half), paged_attention_ref(*widened), **FP32_TOL)


def test_store_kv_rounds_into_a_half_precision_cache() -> None:
    kv = torch.zeros(2, 4, 16, 2, 64, dtype=torch.bfloat16)
    k, v = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    slots = torch.tensor([3, 17, 18, 40, 63])
    store_kv(k, v, kv, slots)
    flat = kv.view(2, 64, 2, 64)
    assert torch.equal(flat[0][slots], k.to(torch.bfloat16)) and torch.equal(flat[1][slots], v.to(torch.bfloat16))


@pytest.mark.usefixtures("native_kernel")
def test_cpu_attention_reads_only_the_context_of_shared_blocks() -> None:
    """Decodes after a prefix-cache hit: four sequences share their first two blocks (3 and 7); every slot
    past a context holds a huge stale value or NaN, and sequence 2, which ends on a block boundary, has a NaN
    block next in its table. The batch mixes three decodes with a prefill chunk behind the cached prefix, and
    int32 metadata works as int64 does."""
    gen = torch.Generator().manual_seed(7)
    page, hk, hq, dim = 8, 2, 6, 64
    kv = torch.randn(2, 12, page, hk, dim, generator=gen)
    lens = [19, 17, 24, 21]
    table = torch.tensor([[3, 7, 1, 0], [3, 7, 5, 0], [3, 7, 9, 2], [3, 7, 4, 0]])
    for b, n in enumerate(lens):
        kv[:, table[b, n // page], n % page :] = float("nan") if b % 2 else 1e30
    kv[:, 2] = float("nan")
    lens_t = torch.tensor(lens)
    q_lens = [1, 1, 1, 5]
    q = torch.randn(sum(q_lens), hq, dim, generator=gen)
    starts = torch.tensor([0, 1, 2, 3, 8])
    want = paged_attention_ref(q, kv, table, lens_t, starts, dim**-0.5)
    got = paged_attention_cpu(q, kv, table.int(), lens_t.int(), starts.int(), dim**-0.5)
    assert not want.isnan().any() and not got.isnan().any()
    torch.testing.assert_close(got, want, **FP32_TOL)


def test_cpu_attention_without_the_kernel_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    case = attention_case(*ATTENTION_CASES["mixed_gqa"], seed=9)
    monkeypatch.setattr(cpu_attention, "use_native", False)
    assert torch.equal(paged_attention_cpu(*case), paged_attention_ref(*case))
    half = case._replace(q=case.q.double(), kv_layer=case.kv_layer.double())  # not float32: the reference
    monkeypatch.setattr(cpu_attention, "use_native", True)
    assert torch.equal(paged_attention_cpu(*half), paged_attention_ref(*half))


# Prompt chunks for the prompt kernel: (q_lens, ctx_lens, hq, hk, dim, page). Its tasks take 64 rows (positions x a
# KV head's query heads) and its key tiles up to 64 tokens within a block.
PREFILL_CASES = {
    # several tasks and key tiles, fresh and behind a cached prefix, beside decodes
    "long_prompts_gqa": ([300, 1, 130, 1], [300, 77, 400, 5], 8, 4, 64, 64),
    # Llama-3's 4:1 group at head_dim 128; pages of 96, so that a key tile stops at a block's end
    "head_128_page96": ([150, 2], [250, 2], 32, 8, 128, 96),
    # a group of 8 (8 positions a task), pages of 16
    "group_8_page16": ([45, 200], [45, 260], 16, 2, 64, 16),
    # MHA: one head a row, 64 positions a task; a chunk of two rows
    "mha_page128": ([129, 2], [129, 300], 4, 4, 64, 128),
}


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_cpu_prompt_attention_in_place_matches_reference(name: str, threads: int) -> None:
    case = attention_case(*PREFILL_CASES[name], seed=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunks = torch.full_like(case.q, 7.0)
        assert cpu_attention.prefill_in_place(*case, chunks)  # not the fallback
        out = paged_attention_cpu(*case)
    finally:
        torch.set_num_threads(before)
    starts = case.query_start_loc.tolist()
    decode_rows = [starts[b] for b in range(len(starts) - 1) if starts[b + 1] - starts[b] == 1]
    assert torch.all(chunks[decode_rows] == 7.0)  # decode rows are left to the decode kernel
    assert not out.isnan().any()
    want = paged_attention_ref(*case)
    torch.testing.assert_close(out, want, **FP32_TOL)
    prompt_rows = [r for r in range(case.q.shape[0]) if r not in decode_rows]
    torch.testing.assert_close(chunks[prompt_rows], want[prompt_rows], **FP32_TOL)


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize(("change", "message"), [
    ("chunk_past_context", "longer than its context"),
    ("context_past_table", "overruns its block table"),
    ("block_outside_cache", "outside the cache"),
])
def test_cpu_prompt_attention_refuses_bad_metadata(change: str, message: str) -> None:
    """A refused batch raises ValueError and writes nothing."""
    case = attention_case(*PREFILL_CASES["long_prompts_gqa"], seed=3)
    lens, table = case.context_lens.clone(), case.block_tables.clone()
    if change == "chunk_past_context":
        lens[2] = 129
    elif change == "context_past_table":
        lens[2] = table.shape[1] * case.kv_layer.shape[2] + 1
    else:
        table[0, 2] = case.kv_layer.shape[1]
    out = torch.full_like(case.q, 7.0)
    with pytest.raises(ValueError, match=message):
        cpu_attention.prefill_in_place(case.q, case.kv_layer, table, lens, case.query_start_loc, case.scale, out)
    assert torch.all(out == 7.0)


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["long_prompts_gqa", "head_128_page96"])
def test_cpu_prompt_attention_over_a_half_precision_cache(name: str, kv_dtype: torch.dtype, threads: int) -> None:
    """--kv-cache-dtype: each tile of keys and values is widened to float32 before the arithmetic, so the kernel
    over a float16 or bfloat16 cache matches the reference over the same values in a float32 cache."""
    case = attention_case(*PREFILL_CASES[name], seed=6)
    half = case._replace(kv_layer=case.kv_layer.to(kv_dtype))
    widened = case._replace(kv_layer=half.kv_layer.float())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.full_like(case.q, 7.0)
        assert cpu_attention.prefill_in_place(*half, out)  # not the fallback
    finally:
        torch.set_num_threads(before)
    starts = case.query_start_loc.tolist()
    prompt_rows = [r for b in range(len(starts) - 1) if starts[b + 1] - starts[b] > 1
                   for r in range(starts[b], starts[b + 1])]
    assert not out[prompt_rows].isnan().any()
    torch.testing.assert_close(out[prompt_rows], paged_attention_ref(*widened)[prompt_rows], **FP32_TOL)


def test_cpu_prompt_attention_leaves_other_dtypes_and_heads_to_the_reference() -> None:
    case = attention_case(*PREFILL_CASES["long_prompts_gqa"], seed=4)
    out = torch.zeros_like(case.q)
    assert not cpu_attention.prefill_in_place(*case._replace(kv_layer=case.kv_layer.double()), out)
    odd = attention_case([40], [40], 4, 2, 32, 16, seed=4)  # head_dim 32
    assert not cpu_attention.prefill_in_place(*odd, torch.zeros_like(odd.q))
    torch.testing.assert_close(paged_attention_cpu(*odd), paged_attention_ref(*odd), **FP32_TOL)
    assert torch.all(out == 0)
