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


def _gather(kv_layer: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = kv_layer.shape[2]
    num_blocks = (num_tokens + block_size - 1) // block_size
    blocks = block_table[..., :num_blocks]
    k = kv_layer[0][blocks].flatten(-4, -3)
    v = kv_layer[1][blocks].flatten(-4, -3)
    return k[..., :num_tokens, :, :], v[..., :num_tokens, :, :]


def _decode_batch(
    q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence, all at the end of their context."""
    max_len = int(context_lens.max())
    k, v = _gather(kv_layer, block_tables, max_len)  # [B, L, Hk, D]
    mask = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]
    # Shorter sequences gather pages past their context (stale or never-written memory): zero them,
    # since a masked-out NaN or inf would still poison the softmax sum (0 * nan).
    outside = ~mask[:, :, None, None]
    k, v = k.masked_fill(outside, 0.0), v.masked_fill(outside, 0.0)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0, :]


def _prefill_one(
    q: torch.Tensor, kv_layer: torch.Tensor, block_table: torch.Tensor, context_len: int, scale: float
) -> torch.Tensor:
    """q: [q_len, Hq, D] for the last q_len positions of a context_len-token sequence."""
    q_len = q.shape[0]
    k, v = _gather(kv_layer, block_table, context_len)  # [L, Hk, D]
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
    """Torch reference: the CPU path and the test oracle. Decodes run as one batch, prefills one by one."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    decode_rows = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    if decode_rows:
        idx = torch.tensor(decode_rows, device=q.device)
        rows = query_start_loc[idx]
        out[rows] = _decode_batch(q[rows], kv_layer, block_tables[idx], context_lens[idx], scale)
    for b in range(len(lens)):
        s, e = starts[b], starts[b + 1]
        if e - s > 1:
            out[s:e] = _prefill_one(q[s:e], kv_layer, block_tables[b], lens[b], scale)
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
    return paged_attention_ref(q, kv_layer, block_tables, context_lens, query_start_loc, scale)
