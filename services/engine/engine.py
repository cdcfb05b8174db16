"""The engine: one step is schedule, execute, update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.errors import InvalidRequest
from services.engine.model_config import ModelConfig, load_model_config
from services.engine.model_runner import ModelRunner, num_kv_blocks
from services.engine.models.llama import LayerKVHook
from services.engine.request import Request, RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RequestOutput, Scheduler, SchedulerOutput
from services.engine.stats import WorkerStats
from services.worker.validation import validate_prompt


@dataclass(frozen=True)
class RemoteBlocks:
    """A reservation for KV computed elsewhere: the prompt's blocks, and how many leading tokens are cached here."""

    block_ids: list[int]
    num_cached_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_config = load_model_config(config.model)
        self.max_model_len = model_config.context_len(config.max_model_len)
        self.model_config: ModelConfig = model_config
        num_blocks = num_kv_blocks(config, model_config)
        block_size = config.block_size
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: give it more blocks or lower max_model_len"
            )
        self.block_manager = BlockManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len)
        self.runner = ModelRunner(config, model_config, num_blocks, self.max_model_len)
        self._last_preemptions = 0

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> Request:
        validate_prompt(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        request = Request(request_id, prompt_token_ids, params, self.model_config.eos_token_ids, priority)
        if params.max_tokens is None:
            request.max_tokens = self.max_model_len - len(prompt_token_ids)
        return request

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        generated: list[int] | None = None,
    ) -> Request:
        """Queues a request. `generated` resumes one whose first tokens were already produced elsewhere
        (a failed hand-off): they are recomputed with the prompt, as after a preemption, not sampled again."""
        if request_id in self.scheduler.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        request = self.make_request(request_id, prompt_token_ids, params, priority)
        request.output_token_ids = list(generated or [])
        self.scheduler.add_request(request)
        return request

    def abort(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def step(self, layer_hook: Callable[[SchedulerOutput], LayerKVHook | None] | None = None) -> list[RequestOutput]:
        """One engine step. `layer_hook`, given the step's schedule, may return a per-layer KV callback
        (the prefill worker streams each layer's KV out while the next layer computes)."""
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched, layer_hook(sched) if layer_hook else None)
        return self.scheduler.update_from_output(sched, result)

    def has_unfinished(self) -> bool:
        """Whether a step has anything to do (reservations awaiting remote KV do not count)."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    # ---- the remote-KV interface: all that the workers use of the engine's insides ----------
    @property
    def block_size(self) -> int:
        return self.block_manager.block_size

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.runner.kv_cache

    def use_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Compute into `kv_cache` (the same shape and dtype) from now on; only before the first step."""
        old = self.runner.kv_cache
        if kv_cache.shape != old.shape or kv_cache.dtype != old.dtype or kv_cache.device != old.device:
            raise ValueError(
                f"a KV cache of {tuple(old.shape)} {old.dtype} on {old.device} is needed, "
                f"got {tuple(kv_cache.shape)} {kv_cache.dtype} on {kv_cache.device}"
            )
        self.runner.kv_cache = kv_cache

    def has_request(self, request_id: str) -> bool:
        return request_id in self.scheduler.requests

    def reserve_remote(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RemoteBlocks | None:
        """Holds blocks for a prompt whose KV comes from elsewhere; None when there is no room."""
        if self.has_request(request_id):
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        request = self.make_request(request_id, prompt_token_ids, params)
        cached = self.scheduler.reserve_remote(request)
        if cached < 0:
            return None
        return RemoteBlocks(list(self.block_manager.block_ids(request_id)), cached)

    def finish_remote(self, request_id: str, first_token: int) -> list[RequestOutput]:
        """The reserved request's KV is in place: it joins the batch with its first token."""
        return self.scheduler.finish_remote(request_id, first_token)

    def hold_blocks(self, holder: str, block_ids: list[int]) -> None:
        """Keep `block_ids` out of reuse under `holder` (KV still being read) until `release_blocks(holder)`."""
        self.block_manager.hold(holder, block_ids)

    def release_blocks(self, holder: str) -> None:
        self.block_manager.free(holder)

    def check_integrity(self) -> str | None:
        """What is wrong with the block bookkeeping, or None."""
        try:
            self.block_manager.check_integrity()
        except AssertionError as e:
            return str(e) or "integrity check failed"
        return None

    def stats(self, worker: str, role: str, take_deltas: bool = True) -> WorkerStats:
        """Current gauges, and (with take_deltas) the counters' increase since the last such call."""
        queries, hits, preemptions = 0, 0, 0
        if take_deltas:
            queries, hits = self.block_manager.take_stats()
            preemptions = self.scheduler.num_preemptions - self._last_preemptions
            self._last_preemptions = self.scheduler.num_preemptions
        return WorkerStats(
            worker=worker,
            role=role,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_waiting_for_remote_kv=len(self.scheduler.remote),
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_blocks=self.block_manager.num_blocks,
            queued_prefill_tokens=self.scheduler.queued_prefill_tokens,
            prefix_cache_queries_delta=queries,
            prefix_cache_hits_delta=hits,
            num_preemptions_delta=preemptions,
        )
