"""Triton paged attention for any mix of decodes and prefill chunks (contract: kernels/attention.py).

Work split. The flattened queries are cut into tiles of BLOCK_Q tokens that never straddle two
sequences. One program takes one tile and one KV head, together with the GROUP query heads that
share that KV head, so each K/V page it loads serves BLOCK_Q * GROUP query rows (GQA-aware):

    rows of a tile:  (token 0, head 0) (token 0, head 1) .. (token 0, head G-1) (token 1, head 0) ..

Sequence b's first tile is numbered  query_start_loc[b] // BLOCK_Q + b. That leaves room for at
most one spare tile per sequence, so the grid (T // BLOCK_Q + B, Hk) covers every tile without
reading any query length on the host. A program finds its sequence by binary search and returns
at once when its tile is a spare.

Each program walks its sequence's pages in order with an online softmax: no split over the
context and no second reduction pass, yet any context length is handled exactly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence whose first tile is <= `tile` (first tiles strictly increase), by binary search."""
    lo = tile * 0
    hi = num_seqs - 1 + lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        go_right = first <= tile
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


@triton.jit
def _attend_pages(
    q, kv_ptr, table_row, num_pages, ctx, last_key, kv_head, qk_scale,
    stride_kv, stride_kb, stride_ks, stride_kh,
    ROWS: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Walks the first `num_pages` pages of one sequence with an online softmax (scores in base 2);
    returns the normalised [ROWS, HEAD_DIM] output, each row over the keys up to its `last_key`."""
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for j in range(0, num_pages):
        page = tl.load(table_row + j).to(tl.int64)
        pos = j * PAGE_SIZE + offs_n
        key_ok = (offs_n < PAGE_SIZE) & (pos < ctx)
        kv_rows = page * stride_kb + offs_n * stride_ks + kv_head * stride_kh
        kv_offs = kv_rows[:, None] + offs_d[None, :]
        k = tl.load(kv_ptr + kv_offs, mask=key_ok[:, None], other=0.0)
        v = tl.load(kv_ptr + stride_kv + kv_offs, mask=key_ok[:, None], other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = key_ok[None, :] & (pos[None, :] <= last_key[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]


@triton.jit
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    qk_scale, num_seqs, max_pages,
    stride_qt, stride_qh, stride_kv, stride_kb, stride_ks, stride_kh, stride_ot, stride_oh, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)

    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    local = tile - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return

    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = local * BLOCK_Q + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    row_ok = (tok < q_len) & (head_in_group < GROUP)
    q_head = kv_head * GROUP + head_in_group
    offs_d = tl.arange(0, HEAD_DIM)

    q_rows = (q_start + tok).to(tl.int64) * stride_qt + q_head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    # Query token i of the sequence sees keys 0 .. ctx - q_len + i.
    last_key = ctx - q_len + tok
    tile_last_tok = tl.minimum(q_len, (local + 1) * BLOCK_Q) - 1
    num_pages = tl.minimum(tl.cdiv(ctx - q_len + tile_last_tok + 1, PAGE_SIZE), max_pages)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    out = _attend_pages(
        q, kv_ptr, table_row, num_pages, ctx, last_key, kv_head, qk_scale,
        stride_kv, stride_kb, stride_ks, stride_kh,
        BLOCK_Q * GROUP_PAD, PAGE_SIZE, BLOCK_N, HEAD_DIM, PRECISION,
    )

    out_rows = (q_start + tok).to(tl.int64) * stride_ot + q_head * stride_oh
    tl.store(
        out_ptr + out_rows[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _check(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    if q.dim() != 3 or kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(
            f"paged_attention_triton: q {tuple(q.shape)} must be [T, Hq, D] and kv_layer "
            f"{tuple(kv_layer.shape)} [2, num_blocks, block_size, Hk, D]"
        )
    head_dim = q.shape[2]
    if kv_layer.shape[4] != head_dim or q.shape[1] % kv_layer.shape[3] != 0:
        raise ValueError("paged_attention_triton: head_dim differs or query heads are not a multiple of KV heads")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"paged_attention_triton: head_dim {head_dim} is not supported (need a power of two, 16-256)")
    if q.dtype not in _FLOAT_DTYPES or kv_layer.dtype != q.dtype:
        raise ValueError(
            f"paged_attention_triton: q {q.dtype} and kv_layer {kv_layer.dtype} must share one of float32, "
            "float16, bfloat16"
        )
    batch = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if batch < 0 or block_tables.dim() != 2 or block_tables.shape[0] != batch or query_start_loc.shape != (batch + 1,):
        raise ValueError(
            f"paged_attention_triton: block_tables {tuple(block_tables.shape)}, context_lens "
            f"{tuple(context_lens.shape)} and query_start_loc {tuple(query_start_loc.shape)} disagree on the batch"
        )
    for name, t in (
        ("block_tables", block_tables),
        ("context_lens", context_lens),
        ("query_start_loc", query_start_loc),
    ):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"paged_attention_triton: {name} must be int32 or int64, got {t.dtype}")
    tensors = (kv_layer, block_tables, context_lens, query_start_loc)
    if any(t.device != q.device for t in tensors):
        raise ValueError("paged_attention_triton: all tensors must be on q's device")
    if q.stride(2) != 1 or kv_layer.stride(4) != 1 or block_tables.stride(1) != 1:
        raise ValueError("paged_attention_triton: q, kv_layer and block_tables need a unit stride on the last dim")
    if not (context_lens.is_contiguous() and query_start_loc.is_contiguous()):
        raise ValueError("paged_attention_triton: context_lens and query_start_loc must be contiguous")


def paged_attention_triton(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract and result as kernels.attention.paged_attention_ref; never syncs with the host.

    Callers guarantee, as for the reference, that q_len <= context_len for every sequence and
    that each block table row holds enough pages for its context (rows are not read past their end).
    """
    _check(q, kv_layer, block_tables, context_lens, query_start_loc)
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = kv_layer.shape
    batch = context_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or batch == 0:
        return out

    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # Mostly decodes: small tiles waste less; prefill: larger tiles reuse each K/V page more.
    rows = 16 if num_tokens <= batch else 64
    block_q = max(1, rows // group_pad)
    block_n = max(16, triton.next_power_of_2(page_size))
    grid = (num_tokens // block_q + batch, num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        kv_layer,
        out,
        block_tables,
        context_lens,
        query_start_loc,
        float(scale) * math.log2(math.e),
        batch,
        block_tables.shape[1],
        q.stride(0),
        q.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out
