"""The prefill worker (a Ray actor): runs prompts and streams each layer's KV to a decode worker.

For every chunk the engine computes, the per-layer hook hands that layer's new K and V to
the UCX sender while the next layer computes, so the transfer overlaps the compute. Prompt
tokens that the prefill side's own prefix cache already held are sent from the cache with
the first chunk.

On CPU the engine's KV cache lives in shared memory that the sender allocates
(`KVSender.allocate_cache`), and a layer goes as the cache blocks it was just written to: the
decode side copies straight out of them, with no staging copy here. The request's blocks are
then held (`BlockManager.hold`) until every send of it has been acknowledged, so that no other
request reuses them while they are read. Elsewhere (CUDA, or no shared memory) the layer's K and
V go as tensors, which the sender stages or registers.
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
from services.env import ENV
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.sender import MAX_SOURCE_BLOCKS, KVSender
from services.worker.base import EngineWorker
from services.worker.fingerprint import kv_fingerprint
from services.worker.messages import PrefillResult, WorkerInfo


def _sending(request_id: str) -> str:
    """Who holds a request's blocks while its KV is being sent (BlockManager.hold)."""
    return f"kv-send:{request_id}"


@dataclass
class SendPlan:
    """Where a request's KV goes: tokens [token_start, prompt_len) to `peer`."""

    peer: str
    token_start: int
    sent_until: int  # prompt positions below this have been queued for sending, every layer
    sends: list[Future[int]] = field(default_factory=list)  # appended on the engine thread


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, config: EngineConfig, transfer: TransferConfig, name: str) -> None:
        # Every step streams KV from the per-layer hook, which CUDA graphs cannot call: capture none.
        super().__init__(dataclasses.replace(config, enforce_eager=True), name)
        self.transfer_config = transfer
        self.sender = KVSender(kv_fingerprint(self), transfer)
        self.plans: dict[str, SendPlan] = {}
        self.shared_cache = False  # the engine's KV cache is the sender's shared one (set by ready)
        self._releases: set[asyncio.Task[None]] = set()
        self.async_engine.layer_hook = self._layer_hook

    async def ready(self) -> WorkerInfo:
        await self.sender.start()  # before the engine thread: see DecodeWorker.ready
        runner = self.engine.runner
        if not self._started and runner.kv_cache.device.type == "cpu":
            shared = self.sender.allocate_cache(tuple(runner.kv_cache.shape))
            if shared is not None:
                runner.kv_cache = shared  # nothing has been computed into the old one yet
                self.shared_cache = True
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
        released: asyncio.Task[None] | None = None
        # Only the first token is sampled here; min_tokens still keeps it from being EOS.
        first_params = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
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
            first_logprobs = outputs[0].logprobs
            result = PrefillResult(
                request_id=request_id,
                first_token=first_token,
                finish_reason=out.finish_reason if out.finish_reason != "length" or params.max_tokens == 1 else None,
                cached_tokens=out.num_cached_tokens,
                transfer_wait_s=time.monotonic() - computed,
                bytes_sent=sum(r for r in results if isinstance(r, int)),
                first_logprob=first_logprobs[0] if first_logprobs else None,
                prompt_logprobs=outputs[0].prompt_logprobs,
            )
        finally:
            planned = self.plans.pop(request_id, None)
            if planned is not None and self.shared_cache:
                released = asyncio.ensure_future(self._release_blocks(request_id, planned))
                self._releases.add(released)
                released.add_done_callback(self._releases.discard)
        if released is not None:
            await asyncio.shield(released)  # so that the KV is whole again once this returns
        return result

    async def _release_blocks(self, request_id: str, plan: SendPlan) -> None:
        """Give back the blocks held for the request's sends once nothing reads them any more.

        That is after every send has resolved (the plan is gone, so the step in progress, if
        any, adds the last ones), and another timeout_s after a failed one: its decode side
        might still be reading.
        """
        await self.async_engine.call(lambda engine: None)  # the step in progress is over
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in plan.sends), return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results):
            await asyncio.sleep(self.transfer_config.timeout_s)
        await self.async_engine.call(lambda engine: engine.block_manager.free(_sending(request_id)))

    # ---- runs on the engine thread -----------------------------------------------------
    def _layer_hook(self, sched: SchedulerOutput) -> LayerKVHook | None:
        """Plans this step's sends: which rows of the batch (and which cached tokens) go where."""
        if self.shared_cache:
            return self._cache_hook(sched)
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

    def _cache_hook(self, sched: SchedulerOutput) -> LayerKVHook | None:
        """`_layer_hook` with a shared cache: each layer goes as the blocks it has just been written to.

        Per request, the positions from token_start on that are not sent yet, up to the end of
        this step (a cached prefix included), go in sends of at most MAX_SOURCE_BLOCKS blocks, and
        the request's blocks are held until those sends are over (see `_release_blocks`).
        """
        loop = self.async_engine.loop
        bm = self.engine.block_manager
        step = (MAX_SOURCE_BLOCKS - 1) * bm.block_size
        sends = []  # (plan, request id, first position, tokens, block table from position 0)
        for s in sched.scheduled:
            plan = self.plans.get(s.request_id)
            if plan is None:
                continue
            start, end = max(plan.sent_until, plan.token_start), s.start_pos + len(s.token_ids)
            plan.sent_until = end
            for lo in range(start, end, step):
                sends.append((plan, s.request_id, lo, min(step, end - lo), s.block_ids))
        if not sends or loop is None or ENV.fault == "drop_kv":
            return None
        for _, rid, _, _, table in sends:
            bm.hold(_sending(rid), table)

        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for plan, rid, start, n, table in sends:
                plan.sends.append(self.sender.submit_cached(loop, plan.peer, rid, layer, start, n, table))

        return on_layer

    def _send(
        self, loop: asyncio.AbstractEventLoop, plan: SendPlan, rid: str, layer: int, start: int,
        k: torch.Tensor, v: torch.Tensor,
    ) -> None:
        plan.sends.append(self.sender.submit(loop, plan.peer, rid, layer, start, k, v))
