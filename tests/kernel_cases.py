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
