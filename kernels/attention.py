"""Attention over the paged KV cache, for any mix of prefill chunks and decodes.

The batch is flattened: sequence b owns query rows [query_start_loc[b], query_start_loc[b+1])
and has context_lens[b] tokens in the cache, its new tokens included. Its queries are the
last q_len of those positions, so query i sees keys 0 .. context_len - q_len + i:

    cache:   |<------------- context_len ------------->|
             |<-- cached prefix -->|<------ q_len ----->|
    query i attends to keys [0, context_len - q_len + i]

A decode is q_len == 1; a prefill chunk after a prefix-cache hit has context_len > q_len.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu_attention import decode_in_place, prefill_in_place


def _gather(kv_layer: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = kv_layer.shape[2]
    num_blocks = (num_tokens + block_size - 1) // block_size
    blocks = block_table[..., :num_blocks]
    k = kv_layer[0][blocks].flatten(-4, -3)
    v = kv_layer[1][blocks].flatten(-4, -3)
    return k[..., :num_tokens, :, :], v[..., :num_tokens, :, :]


# Decodes are computed in groups whose gathered K and V take about this many bytes. One gather for a
# large batch is tens of MiB of freshly mapped memory, written once and read once: several times slower
# on CPU than groups that stay in the last-level cache and in reused heap memory.
DECODE_GROUP_BYTES = 4 * 2**20


def _decode_group(
    q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, lens: list[int], scale: float
) -> torch.Tensor:
    """q: [B, Hq, D] for B sequences with context lengths `lens`, one query each at its last position."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    max_len = max(lens)
    num_blocks = (max_len + block_size - 1) // block_size
    index = block_tables[:, :num_blocks].reshape(-1)
    shape = (batch, num_blocks * block_size, num_kv_heads, head_dim)
    k = kv_layer[0].index_select(0, index).view(shape)
    v = kv_layer[1].index_select(0, index).view(shape)
    mask = None
    if min(lens) < shape[1]:
        keep = torch.arange(shape[1], device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]
        # Slots past a context were never written for this sequence: zero them, so that whatever they hold
        # (stale values, NaN) cannot leak through a masked score times a value.
        stale = (~keep).flatten().nonzero()[:, 0]
        k.view(-1, num_kv_heads, head_dim).index_fill_(0, stale, 0)
        v.view(-1, num_kv_heads, head_dim).index_fill_(0, stale, 0)
        mask = keep[:, None, None, :]
    # All of a sequence's query heads sit at the same position, so the heads sharing a KV head act as
    # that head's queries: no GQA expansion and no causal mask, only the padding mask.
    qg = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k, v = k.to(q.dtype), v.to(q.dtype)  # a cache of another dtype (--kv-cache-dtype) is widened here
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def _decode_batch(
    q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence, all at the end of their context.

    Sequences are sorted by length and cut into groups of about DECODE_GROUP_BYTES of K and V.
    """
    lens = context_lens.tolist()
    order = sorted(range(len(lens)), key=lens.__getitem__)
    token_bytes = 2 * kv_layer.shape[3] * kv_layer.shape[4] * kv_layer.element_size()
    out = torch.empty_like(q)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * lens[order[end]] * token_bytes <= DECODE_GROUP_BYTES:
            end += 1
        rows = order[start:end]
        idx = torch.tensor(rows, device=q.device)
        group = _decode_group(q[idx], kv_layer, block_tables[idx], [lens[r] for r in rows], scale)
        out.index_copy_(0, idx, group)
        start = end
    return out


def _prefill_one(
    q: torch.Tensor, kv_layer: torch.Tensor, block_table: torch.Tensor, context_len: int, scale: float
) -> torch.Tensor:
    """q: [q_len, Hq, D] for the last q_len positions of a context_len-token sequence."""
    q_len = q.shape[0]
    k, v = _gather(kv_layer, block_table, context_len)  # [L, Hk, D]
    k, v = k.to(q.dtype), v.to(q.dtype)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if q_len == context_len:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(q_len, device=q.device)[:, None] + (context_len - q_len)
        mask = torch.arange(context_len, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference: the test oracle, and the CPU path where the in-place decode kernel cannot run.
    Decodes run as one batch, prefills one by one."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    decode_rows = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    if decode_rows:
        idx = torch.tensor(decode_rows, device=q.device)
        rows = query_start_loc[idx]
        out[rows] = _decode_batch(q[rows], kv_layer, block_tables[idx], context_lens[idx], scale)
    _prefill_rows(out, q, kv_layer, block_tables, starts, lens, scale)
    return out


def _prefill_rows(out: torch.Tensor, q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                  starts: list[int], lens: list[int], scale: float) -> None:
    """Writes the rows of every sequence with more than one query row (a prefill chunk), one sequence at a time."""
    for b in range(len(lens)):
        s, e = starts[b], starts[b + 1]
        if e - s > 1:
            out[s:e] = _prefill_one(q[s:e], kv_layer, block_tables[b], lens[b], scale)


def paged_attention_cpu(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The CPU path: decodes (kernels/cpu_decode.c) and prompt chunks (kernels/cpu_prefill.c) read the cache in
    place. Falls back to the reference where a kernel cannot run (no C compiler, other dtypes or heads)."""
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    decode_lens = [lens[b] for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if not decode_in_place(q, kv_layer, block_tables, context_lens, query_start_loc, scale, out, decode_lens):
        return paged_attention_ref(q, kv_layer, block_tables, context_lens, query_start_loc, scale)
    if len(decode_lens) < len(lens) and not prefill_in_place(
            q, kv_layer, block_tables, context_lens, query_start_loc, scale, out):
        _prefill_rows(out, q, kv_layer, block_tables, starts, lens, scale)
    return out


def paged_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; kv_layer: [2, num_blocks, block_size, Hk, D]; block_tables: [B, max_blocks] int64;
    context_lens: [B] int64; query_start_loc: [B + 1] int64. Returns [T, Hq, D]."""
    if q.dim() != 3 or kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} or kv_layer {tuple(kv_layer.shape)} has a bad rank")
    if q.shape[-1] != kv_layer.shape[-1] or q.shape[1] % kv_layer.shape[3] != 0:
        raise ValueError("paged_attention: head_dim differs or query heads are not a multiple of KV heads")
    batch = context_lens.shape[0]
    if block_tables.shape[0] != batch or query_start_loc.shape != (batch + 1,):
        raise ValueError("paged_attention: block_tables, context_lens and query_start_loc disagree on the batch")
    if q.is_cuda:
        from kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(q, kv_layer, block_tables, context_lens, query_start_loc, scale)
    return paged_attention_cpu(q, kv_layer, block_tables, context_lens, query_start_loc, scale)
