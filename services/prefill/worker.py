"""The prefill worker (a Ray actor): runs prompts and streams each layer's KV to a decode worker.

For every chunk the engine computes, the per-layer hook hands that layer's new K and V to the UCX
sender while the next layer computes, so the transfer overlaps the compute. Which positions of
which request go where is planned per step in send_plan.py; prompt tokens that the prefill side's
own prefix cache already held are sent with the first chunk.

On CPU the engine's KV cache lives in shared memory that the sender allocates
(`KVSender.allocate_cache`), and a layer goes as the cache blocks it was just written to: the
decode side copies straight out of them, with no staging copy here. The request's blocks are then
held (`LLMEngine.hold_blocks`) until every send of it has been acknowledged, so that no other
request reuses them while they are read. Elsewhere (CUDA, or no shared memory) the layer's K and V
go as tensors, which the sender stages or registers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.models.llama import LayerKVHook
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RequestOutput, SchedulerOutput
from services.env import ENV
from services.prefill.send_plan import (
    BatchRows,
    CacheBlocks,
    PlannedSend,
    SendPlan,
    plan_from_batch,
    plan_from_cache,
)
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.kv import KVBlocks, KVTensors, LayerKV
from services.transfer.sender import MAX_SOURCE_BLOCKS, KVSender
from services.worker.base import EngineWorker
from services.worker.cores import Cores
from services.worker.fingerprint import kv_fingerprint
from services.worker.messages import PrefillResult, WorkerInfo

# One send's K and V of a layer, given that layer's K and V of the whole batch.
LayerKVOf = Callable[[int, torch.Tensor, torch.Tensor], LayerKV]


def _sending(request_id: str) -> str:
    """Who holds a request's blocks while its KV is being sent (LLMEngine.hold_blocks)."""
    return f"kv-send:{request_id}"


def _result(
    request_id: str, params: SamplingParams, outputs: list[RequestOutput], transfer_wait_s: float, bytes_sent: int
) -> PrefillResult:
    out = outputs[-1]
    first_logprobs = outputs[0].logprobs
    return PrefillResult(
        request_id=request_id,
        first_token=outputs[0].new_token_ids[0],
        finish_reason=out.finish_reason if out.finish_reason != "length" or params.max_tokens == 1 else None,
        cached_tokens=out.num_cached_tokens,
        transfer_wait_s=transfer_wait_s,
        bytes_sent=bytes_sent,
        first_logprob=first_logprobs[0] if first_logprobs else None,
        prompt_logprobs=outputs[0].prompt_logprobs,
    )


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, config: EngineConfig, transfer: TransferConfig, name: str, cores: Cores | None = None) -> None:
        # Every step streams KV from the per-layer hook, which CUDA graphs cannot call: capture none.
        super().__init__(dataclasses.replace(config, enforce_eager=True), name, cores)
        self.transfer_config = transfer = transfer.on_node()
        self.sender = KVSender(kv_fingerprint(self), transfer)
        self.plans: dict[str, SendPlan] = {}
        self.shared_cache = False  # the engine's KV cache is the sender's shared one (set by ready)
        self._releases: set[asyncio.Task[None]] = set()
        self.async_engine.layer_hook = self._layer_hook

    async def ready(self) -> WorkerInfo:
        await self.sender.start()  # before the engine thread: see DecodeWorker.ready
        engine = self.engine
        if not self._started and engine.kv_cache.device.type == "cpu":
            shared = self.sender.allocate_cache(tuple(engine.kv_cache.shape))
            if shared is not None:
                engine.use_kv_cache(shared)  # nothing has been computed into the old one yet
                self.shared_cache = True
        self._ensure_started()
        return WorkerInfo(self.name, self.role, None, engine.block_size, engine.num_blocks)

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
            outputs: list[RequestOutput] = []
            async for batch in self.async_engine.outputs(request_id, stream):
                outputs.extend(batch)
            if not outputs[0].new_token_ids:  # aborted (or failed) before its first token
                raise TransferError("cancelled", f"request {request_id} ended before its first token "
                                    f"({outputs[-1].finish_reason})")
            computed = time.monotonic()
            plan = self.plans[request_id]
            sends = [asyncio.wrap_future(f) for f in plan.sends]
            results = await asyncio.gather(*sends, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure if isinstance(failure, TransferError) else TransferError("peer_gone", str(failure))
            sent = sum(r for r in results if isinstance(r, int))
            result = _result(request_id, params, outputs, time.monotonic() - computed, sent)
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
        await self.async_engine.call(lambda engine: engine.release_blocks(_sending(request_id)))

    # ---- runs on the engine thread -----------------------------------------------------
    def _layer_hook(self, sched: SchedulerOutput) -> LayerKVHook | None:
        """This step's sends (see send_plan.py) as a callback that submits each layer's share of them."""
        loop = self.async_engine.loop
        plans = dict(self.plans)  # the requests in this step keep theirs, even if prefill() pops them meanwhile
        engine = self.engine
        if self.shared_cache:
            sends = plan_from_cache(sched.scheduled, plans, engine.block_size, MAX_SOURCE_BLOCKS)
        else:
            sends = plan_from_batch(sched.scheduled, plans, engine.block_size)
        if not sends or loop is None or ENV.fault == "drop_kv":
            return None
        for send in sends:
            if isinstance(send.source, CacheBlocks):
                engine.hold_blocks(_sending(send.request_id), send.source.block_table)
        jobs = [(plans[send.request_id], send, self._layer_kv(send)) for send in sends]

        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for plan, send, kv_of in jobs:
                kv = kv_of(layer, k, v)
                plan.sends.append(self.sender.submit(loop, send.peer, send.request_id, layer, send.token_start, kv))

        return on_layer

    def _layer_kv(self, send: PlannedSend) -> LayerKVOf:
        """Where the send's K and V of each layer come from: the shared cache, the batch, or the KV cache."""
        source = send.source
        if isinstance(source, CacheBlocks):
            blocks = KVBlocks(send.num_tokens, source.block_table)
            return lambda layer, k, v: blocks
        if isinstance(source, BatchRows):
            rows, dtype = slice(source.start, source.stop), self.engine.kv_cache.dtype  # --kv-cache-dtype
            return lambda layer, k, v: KVTensors(k[rows].to(dtype), v[rows].to(dtype))
        slots = torch.tensor(source.slots)
        kv_cache = self.engine.kv_cache

        def gather(layer: int, k: torch.Tensor, v: torch.Tensor) -> LayerKV:
            flat = kv_cache[layer].flatten(1, 2)
            return KVTensors(flat[0][slots], flat[1][slots])

        return gather
