"""The CPU path of paged attention: decodes (cpu_decode.c) and prompt chunks (cpu_prefill.c) read K and V in place
in small C kernels.

The reference (attention.paged_attention_ref) gathers each decode's blocks into a dense [B, L, Hk, D] copy
before attending: at batch 32 and 256 tokens that is 16 MiB written and read again per layer, and about 20
small tensor ops per layer at batch 1. The kernel walks the block table instead: one pass over K, a softmax,
one pass over V, with no copy and no mask (slots past a context are never read).

A prompt chunk in the reference gathers its context and runs torch's SDPA, whose CPU kernel computed 65-90
GFLOP/s on two threads here, against about 320 for the step's products. The prompt kernel walks the blocks in
FlashAttention's order on register tiles, and skips the key tiles above the causal diagonal.

The kernels are built with the other CPU kernels (kernels/cpu_native.py). Both read a float32, float16 or
bfloat16 cache (`--kv-cache-dtype`) and compute in float32; the prompt kernel takes heads of 64 or 128. Without a
compiler, or for other dtypes and heads, the reference runs instead.
"""

from __future__ import annotations

import threading

import torch

from kernels.cpu_native import KV_TYPES, library

# Decodes whose K and V together take less than this run on the calling thread alone: waking the team's
# other threads costs up to tens of microseconds, about what reading this much takes.
THREAD_MIN_BYTES = 2**20

PREFILL_MAX_GROUP = 64  # most query heads per KV head the prompt kernel takes (ROWS in cpu_prefill.c)
# pd_prefill_attention's refusals (nothing written)
PREFILL_REFUSALS = {1: "a prompt chunk is longer than its context", 2: "a context overruns its block table",
                    3: "a block table names a block outside the cache", 6: "out of memory"}

use_native = True  # False: every CPU call runs the torch reference (benchmarks compare the two)


def decode_in_place(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    decode_lens: list[int],
) -> bool:
    """Writes out[row] for every sequence with one query row; False (nothing written) where the kernel
    cannot take these tensors. decode_lens: the context lengths of those sequences. The kernel trusts the
    block table's entries below each context to name blocks of kv_layer, as the Triton kernel does."""
    so = library() if use_native else None
    if so is None or q.dtype != torch.float32 or kv_layer.dtype not in KV_TYPES or q.stride(-1) != 1:
        return False
    if not decode_lens:
        return True
    kv = kv_layer.contiguous()
    tables, lens, starts = (t.to(torch.int64).contiguous() for t in (block_tables, context_lens, query_start_loc))
    _, num_blocks, block_size, num_kv_heads, head_dim = kv.shape
    if max(decode_lens) > tables.shape[1] * block_size:
        raise ValueError(f"paged_attention: a context of {max(decode_lens)} tokens overruns its block table")
    token_bytes = 2 * num_kv_heads * head_dim * kv.element_size()
    threads = torch.get_num_threads() if sum(decode_lens) * token_bytes >= THREAD_MIN_BYTES else 1
    per_thread = q.shape[1] * max(decode_lens) + num_kv_heads * head_dim  # scores, then one token row widened
    scratch = torch.empty(threads * per_thread, dtype=torch.float32)
    so.pd_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), kv.data_ptr(), KV_TYPES[kv.dtype], num_blocks, tables.data_ptr(),
        tables.stride(0), lens.data_ptr(), starts.data_ptr(), lens.shape[0], block_size, q.shape[1], num_kv_heads,
        head_dim, scale, out.data_ptr(), out.stride(0), out.stride(1), scratch.data_ptr(), per_thread, threads,
    )  # fmt: skip
    return True


_scratch = threading.local()


def prefill_in_place(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> bool:
    """Writes out[rows] for every sequence with more than one query row (a prompt chunk); False (nothing
    written) where the kernel cannot take these tensors. ValueError for a chunk longer than its context, a
    context past its block table, or a block id outside the cache."""
    so = library() if use_native else None
    head_dim = q.shape[-1]
    _, num_blocks, block_size, num_kv_heads, _ = kv_layer.shape
    if (so is None or q.dtype != torch.float32 or kv_layer.dtype not in KV_TYPES or head_dim not in (64, 128)
            or q.shape[1] // num_kv_heads > PREFILL_MAX_GROUP or q.stride(-1) != 1):
        return False
    kv = kv_layer.contiguous()
    tables, lens, starts = (t.to(torch.int64).contiguous() for t in (block_tables, context_lens, query_start_loc))
    threads = torch.get_num_threads()
    per_thread = so.pd_prefill_attention_scratch(head_dim)
    scratch = getattr(_scratch, "buffer", None)
    if scratch is None or scratch.numel() < threads * per_thread:
        scratch = _scratch.buffer = torch.empty(threads * per_thread, dtype=torch.float32)
    failed = so.pd_prefill_attention(
        q.data_ptr(), q.stride(0), q.stride(1), kv.data_ptr(), KV_TYPES[kv.dtype], num_blocks, tables.data_ptr(),
        tables.stride(0), lens.data_ptr(), starts.data_ptr(), lens.shape[0], block_size, q.shape[1], num_kv_heads,
        head_dim, scale, out.data_ptr(), out.stride(0), out.stride(1), scratch.data_ptr(), per_thread, threads,
    )  # fmt: skip
    if failed:
        raise ValueError(f"paged_attention: {PREFILL_REFUSALS.get(failed, f'refused ({failed})')}")
    return True
