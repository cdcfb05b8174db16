"""The prefill worker (a Ray actor): runs prompts and streams each layer's KV to a decode worker.

For every chunk the engine computes, the per-layer hook hands that layer's new K and V to
the UCX sender while the next layer computes, so the transfer overlaps the compute. Prompt
tokens that the prefill side's own prefix cache already held are sent from the cache with
the first chunk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.models.llama import LayerKVHook
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import SchedulerOutput
from services.engine.worker_base import EngineWorker
from services.engine.worker_messages import PrefillResult, WorkerInfo
from services.env import ENV
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.fingerprint import KVFingerprint
from services.transfer.sender import KVSender


@dataclass
class SendPlan:
    """Where a request's KV goes: tokens [token_start, prompt_len) to `peer`."""

    peer: str
    token_start: int
    sent_until: int  # prompt positions below this have been queued for sending, every layer
    sends: list[Future[int]] = field(default_factory=list)  # appended on the engine thread


def kv_fingerprint(worker: EngineWorker) -> KVFingerprint:
    cfg = worker.engine.model_config
    return KVFingerprint(
        model=cfg.name,
        dtype=worker.config.torch_dtype_name,
        block_size=worker.config.cache.block_size,
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
    )


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, config: EngineConfig, transfer: TransferConfig, name: str) -> None:
        # Every step streams KV from the per-layer hook, which CUDA graphs cannot call: capture none.
        super().__init__(dataclasses.replace(config, enforce_eager=True), name)
        self.transfer_config = transfer
        self.sender = KVSender(kv_fingerprint(self), transfer)
        self.plans: dict[str, SendPlan] = {}
        self.async_engine.layer_hook = self._layer_hook

    async def ready(self) -> WorkerInfo:
        await self.sender.start()  # before the engine thread: see DecodeWorker.ready
        self._ensure_started()
        bm = self.engine.block_manager
        return WorkerInfo(self.name, self.role, None, bm.block_size, bm.num_blocks)

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, peer: str, token_start: int
    ) -> PrefillResult:
        """Computes the prompt, sends its KV from token_start on to `peer`, returns the first token.

        Raises TransferError when the KV could not be delivered.
        """
        self._ensure_started()
        first_params = dataclasses.replace(params, max_tokens=1)
        stream = self.async_engine.open_stream(request_id)
        self.plans[request_id] = SendPlan(peer, token_start, token_start)

        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt_token_ids, first_params)

        try:
            await self.async_engine.call(add)
            outputs = []
            async for batch in self.async_engine.outputs(request_id, stream):
                outputs.extend(batch)
            computed = time.monotonic()
            plan = self.plans[request_id]
            sends = [asyncio.wrap_future(f) for f in plan.sends]
            results = await asyncio.gather(*sends, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure if isinstance(failure, TransferError) else TransferError("peer_gone", str(failure))
            out = outputs[-1]
            first_token = outputs[0].new_token_ids[0]
            return PrefillResult(
                request_id=request_id,
                first_token=first_token,
                finish_reason=out.finish_reason if out.finish_reason != "length" or params.max_tokens == 1 else None,
                cached_tokens=out.num_cached_tokens,
                transfer_wait_s=time.monotonic() - computed,
                bytes_sent=sum(r for r in results if isinstance(r, int)),
            )
        finally:
            self.plans.pop(request_id, None)

    # ---- runs on the engine thread -----------------------------------------------------
    def _layer_hook(self, sched: SchedulerOutput) -> LayerKVHook | None:
        """Plans this step's sends: which rows of the batch (and which cached tokens) go where."""
        loop = self.async_engine.loop
        jobs = []  # (plan, request_id, batch rows lo:hi, first position, cached-prefix start and slots)
        row = 0
        for s in sched.scheduled:
            n = len(s.token_ids)
            plan = self.plans.get(s.request_id)
            if plan is not None:
                cached_slots = None
                if plan.sent_until < s.start_pos:
                    bs = self.engine.block_manager.block_size
                    positions = range(plan.sent_until, s.start_pos)
                    cached_slots = torch.tensor([s.block_ids[p // bs] * bs + p % bs for p in positions])
                first = max(s.start_pos, plan.token_start)
                skip = first - s.start_pos
                jobs.append((plan, s.request_id, row + skip, row + n, first, plan.sent_until, cached_slots))
                plan.sent_until = s.start_pos + n
            row += n
        if not jobs or loop is None or ENV.fault == "drop_kv":
            return None
        kv_cache = self.engine.runner.kv_cache

        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for plan, rid, lo, hi, first, cached_start, cached_slots in jobs:
                if cached_slots is not None:
                    flat = kv_cache[layer].flatten(1, 2)
                    self._send(loop, plan, rid, layer, cached_start, flat[0][cached_slots], flat[1][cached_slots])
                if hi > lo:
                    self._send(loop, plan, rid, layer, first, k[lo:hi], v[lo:hi])

        return on_layer

    def _send(
        self, loop: asyncio.AbstractEventLoop, plan: SendPlan, rid: str, layer: int, start: int,
        k: torch.Tensor, v: torch.Tensor,
    ) -> None:
        plan.sends.append(self.sender.submit(loop, plan.peer, rid, layer, start, k, v))
