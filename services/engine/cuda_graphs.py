"""CUDA graphs for pure-decode steps.

A decode step of a large model on a GPU is a few hundred small kernel launches; launching them from
Python costs more than running them. So the runner captures the whole forward pass plus the logits,
once per batch-size bucket, and replays the graph of the smallest bucket that holds the batch.

Graphs read and write fixed tensors, so the batch is copied into static buffers first. Rows past the
real batch are padding:

    rows:  | 0 .. n-1: the real decodes | n .. bucket-1: padding |
    slot_mapping                          -1   (store_kv skips it: no cache write)
    context_lens                           1   (reads one slot of page 0; output discarded)

Built without capture (`capture=False`) the same padded path runs eagerly, which lets the CPU tests
check the padding logic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.engine.models.llama import AttentionBatch

if TYPE_CHECKING:
    from services.engine.models.llama import LlamaForCausalLM


MAX_GRAPH_BATCH = 256  # larger decode batches run eagerly: launch overhead no longer dominates them


def batch_buckets(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 16 up to max_batch (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        max_batch: int,
        max_blocks_per_seq: int,
        capture: bool = True,
    ) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.buckets = batch_buckets(max_batch)
        self.max_blocks_per_seq = max_blocks_per_seq
        device = kv_cache.device

        def index(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.int64, device=device)

        self.input_ids, self.positions = index(max_batch), index(max_batch)
        self.slot_mapping = index(max_batch).fill_(-1)
        self.context_lens = index(max_batch).fill_(1)
        self.block_tables = index(max_batch, max_blocks_per_seq)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def fits(self, batch: AttentionBatch) -> bool:
        """True when a bucket holds the batch and its block tables."""
        return (
            batch.context_lens.shape[0] <= self.buckets[-1]
            and batch.block_tables.shape[1] <= self.max_blocks_per_seq
        )

    def run(self, input_ids: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Logits [n, vocab] for a pure-decode batch of n sequences (one new token each) that `fits`."""
        n, width = batch.context_lens.shape[0], batch.block_tables.shape[1]
        bucket = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.slot_mapping[n:bucket].fill_(-1)
        self.context_lens[:n].copy_(batch.context_lens)
        self.context_lens[n:bucket].fill_(1)
        self.block_tables[:n, :width].copy_(batch.block_tables)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.logits[bucket][:n]
        return self._forward(bucket)[:n]

    def _forward(self, bucket: int) -> torch.Tensor:
        batch = AttentionBatch(
            positions=self.positions[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
        )
        hidden = self.model(self.input_ids[:bucket], batch, self.kv_cache)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bucket in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
            self._forward(bucket)  # compiles the kernels for this shape outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bucket] = self._forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
