"""Paged-attention inputs shared by the interpreted (tests/unit) and compiled (tests/gpu) kernel tests."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AttentionCase(NamedTuple):
    q: torch.Tensor
    kv_layer: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float


def attention_case(
    q_lens: list[int],
    ctx_lens: list[int],
    hq: int,
    hk: int,
    dim: int,
    page: int,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AttentionCase:
    """Random pages in a shuffled pool; unused table entries point at other sequences' pages and
    page tails past a context hold NaN, so reading too far changes the result. Drawn on the CPU
    in float32, then moved to `device` in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-c // page) for c in ctx_lens]
    width = max(pages) + 2
    pool = sum(pages) + 3
    kv_layer = torch.randn(2, pool, page, hk, dim, generator=gen)
    order = torch.randperm(pool, generator=gen)
    table = torch.randint(0, pool, (len(q_lens), width), generator=gen)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[used : used + n]
        used += n
        tail = ctx_lens[b] - (n - 1) * page
        if n and tail < page:
            kv_layer[:, table[b, n - 1], tail:] = float("nan")  # never-written cache memory
    tokens = sum(q_lens)
    # q is a strided view into a fused qkv projection, as the model produces it.
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).to(device, dtype)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int64)
    lens = torch.tensor(ctx_lens, dtype=torch.int64)
    return AttentionCase(
        q, kv_layer.to(device, dtype), table.to(device), lens.to(device), starts.to(device), dim**-0.5
    )


# The cases both the Triton (interpreted) and the CPU kernel tests run: (q_lens, ctx_lens, hq, hk, dim, page).
ATTENTION_CASES = {
    # decodes + a prefill chunk after a cached prefix + a fresh prefill + an idle sequence, GQA 4:1
    "mixed_gqa": ([1, 9, 1, 23, 0, 1], [37, 30, 1, 23, 5, 16], 8, 2, 64, 16),
    # MHA, head_dim 128, a chunk longer than one query tile behind a prefix, plus a decode
    "mha_long_chunk": ([70, 1], [85, 50], 2, 2, 128, 16),
    # decode only, one KV head for four query heads, a long context over many small pages
    "decode_long_context": ([1, 1, 1], [150, 7, 64], 4, 1, 64, 8),
    # a group of 3 (padded to 4) and a page size that is not a power of two
    "odd_group_page5": ([3, 1, 12], [10, 11, 12], 6, 2, 64, 5),
    "page32": ([17, 1], [40, 33], 4, 4, 64, 32),
    "single_sequence": ([20], [45], 4, 2, 64, 16),
    # decodes of very different lengths, which the CPU kernel's threads split by KV read, not by count
    "uneven_decodes": ([1] * 9, [300, 2, 3, 90, 1, 64, 65, 7, 200], 4, 2, 64, 64),
}

FP32_TOL = {"atol": 2e-5, "rtol": 1e-4}
