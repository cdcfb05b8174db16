"""Runs a scheduled batch through the model: builds the flattened inputs, runs the forward pass, samples."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kernels.huge_pages import zeros_on_huge_pages
from services.engine.config import EngineConfig
from services.engine.cuda_graphs import MAX_GRAPH_BATCH, DecodeGraphs
from services.engine.logprobs import TokenLogprob
from services.engine.model_config import ModelConfig
from services.engine.model_loader import TORCH_DTYPES, load_model
from services.engine.models.llama import AttentionBatch, LayerKVHook
from services.engine.sampler import sample, token_logprobs
from services.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput

PROMPT_LOGPROBS_ROWS = 512  # prompt rows turned into logits at once: bounds the [rows, vocab] float32 temporaries


def num_kv_blocks(config: EngineConfig, model: ModelConfig) -> int:
    if config.cache.num_blocks is not None:
        return config.cache.num_blocks
    itemsize = TORCH_DTYPES[config.kv_cache_dtype_name].itemsize
    per_block = 2 * model.num_layers * model.num_kv_heads * model.head_dim * config.block_size * itemsize
    return max(config.cache.kv_cache_bytes // per_block, 1)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (None: left as they are)."""
    if threads is None or threads == (before := torch.get_num_threads()):
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, num_blocks: int, max_model_len: int) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = load_model(model_config, config.device, config.torch_dtype_name)
        # A step of one row runs on config.single_row_threads; the model picks its products for single rows there.
        self.single_row_threads = config.single_row_threads if self.device.type == "cpu" else None
        if self.device.type == "cpu":
            with torch_threads(self.single_row_threads):
                self.model.prepare_cpu()
        shape = (model_config.num_layers, 2, num_blocks, self.block_size, model_config.num_kv_heads,
                 model_config.head_dim)
        kv_dtype = TORCH_DTYPES[config.kv_cache_dtype_name]
        if self.device.type == "cpu":
            self.kv_cache = zeros_on_huge_pages(shape, kv_dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=kv_dtype, device=self.device)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            max_blocks_per_seq = -(-max_model_len // self.block_size)
            max_batch = min(config.scheduler.max_num_seqs, MAX_GRAPH_BATCH)
            self.graphs = DecodeGraphs(self.model, self.kv_cache, max_batch, max_blocks_per_seq)

    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, AttentionBatch]:
        """The step's inputs, built from Python lists in four tensor constructions whatever the batch size."""
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        starts = [0]
        tables: list[list[int]] = []
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        for s in sched.scheduled:
            n, start, blocks = len(s.token_ids), s.start_pos, s.block_ids
            tokens += s.token_ids
            positions += range(start, start + n)
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            context_lens.append(start + n)
            starts.append(starts[-1] + n)
            tables.append(blocks + [0] * (max_blocks - len(blocks)))
        flat = torch.tensor([tokens, positions, slots], dtype=torch.int64, device=self.device)
        batch = AttentionBatch(
            positions=flat[1],
            slot_mapping=flat[2],
            block_tables=torch.tensor(tables, dtype=torch.int64, device=self.device),
            context_lens=torch.tensor(context_lens, dtype=torch.int64, device=self.device),
            query_start_loc=torch.tensor(starts, dtype=torch.int64, device=self.device),
        )
        return flat[0], batch

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, on_layer_kv: LayerKVHook | None = None) -> RunnerOutput:
        if not sched.scheduled:
            return RunnerOutput()
        input_ids, batch = self._prepare(sched)
        with torch_threads(self.single_row_threads if input_ids.shape[0] == 1 else None):
            return self._execute(sched, input_ids, batch, on_layer_kv)

    def _execute(self, sched: SchedulerOutput, input_ids: torch.Tensor, batch: AttentionBatch,
                 on_layer_kv: LayerKVHook | None) -> RunnerOutput:
        sampling = [s for s in sched.scheduled if s.sample]
        all_decode = len(sampling) == len(sched.scheduled) == input_ids.shape[0]
        out = RunnerOutput()
        if self.graphs is not None and on_layer_kv is None and all_decode and self.graphs.fits(batch):
            logits = self.graphs.run(input_ids, batch)  # pure decode: no row predicts a prompt token
        else:
            hidden = self.model(input_ids, batch, self.kv_cache, on_layer_kv)
            out.prompt_logprobs = self._prompt_logprobs(sched.scheduled, hidden)
            if not sampling:
                return out
            if not all_decode:
                ends = batch.query_start_loc[1:] - 1
                rows = torch.tensor([i for i, s in enumerate(sched.scheduled) if s.sample], device=self.device)
                hidden = hidden[ends[rows]]
            logits = self.model.compute_logits(hidden)
        tokens, logprobs = sample(logits, sampling)
        out.sampled = {s.request_id: t for s, t in zip(sampling, tokens, strict=True)}
        out.logprobs = {s.request_id: lp for s, lp in zip(sampling, logprobs, strict=True) if lp is not None}
        return out

    def _prompt_logprobs(
        self, scheduled: list[ScheduledRequest], hidden: torch.Tensor
    ) -> dict[str, list[TokenLogprob]]:
        """Logprobs of the prompt tokens predicted by the rows of each chunk scheduled with prompt_logprobs.

        Row j of a chunk (position start_pos + j) predicts prompt token start_pos + 1 + j; rows at or
        past the prompt's last token (a resumed request's generated tokens) predict none.
        """
        found: dict[str, list[TokenLogprob]] = {}
        lo = 0
        for s in scheduled:
            first = lo
            lo += len(s.token_ids)
            if not s.prompt_logprobs:
                continue
            num_top = s.sampling_params.prompt_logprobs or 0
            targets = s.prompt_token_ids[s.start_pos + 1 : s.start_pos + 1 + len(s.token_ids)]
            entries: list[TokenLogprob] = []
            for a in range(0, len(targets), PROMPT_LOGPROBS_ROWS):
                part = targets[a : a + PROMPT_LOGPROBS_ROWS]
                logits = self.model.compute_logits(hidden[first + a : first + a + len(part)])
                entries += token_logprobs(torch.log_softmax(logits, dim=-1), part, [num_top] * len(part))
            found[s.request_id] = entries
        return found
