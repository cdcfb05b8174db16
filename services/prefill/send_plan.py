"""Which KV each prefill step sends where, in plain data: from the scheduled requests to a list of sends.

One request's prompt positions, as a step sees them (chunk: the positions this step computes):

    0 ──────────── token_start ─────────── sent_until ────────── start_pos ───────── start_pos + n
      the decode side has these           queued in            this side had         this step's chunk
      cached (it skips them)              earlier steps        them cached           (n batch rows)

Each step queues every position of a planned request from max(sent_until, token_start) to the end
of its chunk, for every layer, and moves sent_until there. Sent as tensors (`plan_from_batch`),
the chunk's positions are rows of the step's batch, and a prefix that this side had cached (its
first chunk starts past sent_until) is gathered from the KV cache. Sent as blocks of a shared KV
cache (`plan_from_cache`), every position is read where it lies, in sends of at most
max_source_blocks blocks. Requests without a plan are not sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from services.engine.scheduler import ScheduledRequest


@dataclass
class SendPlan:
    """Where a request's KV goes: tokens [token_start, prompt_len) to `peer`."""

    peer: str
    token_start: int
    sent_until: int  # prompt positions below this have been queued for sending, every layer
    sends: list[Future[int]] = field(default_factory=list)  # appended on the engine thread


@dataclass(frozen=True)
class BatchRows:
    """Rows [start, stop) of the step's batch: K and V as the model computes each layer of it."""

    start: int
    stop: int


@dataclass(frozen=True)
class CachedSlots:
    """KV cache slots (block * block_size + offset) of positions computed before this step."""

    slots: list[int]


@dataclass(frozen=True)
class CacheBlocks:
    """The request's blocks of a shared KV cache, from position 0, which the decode side reads in place."""

    block_table: list[int]


@dataclass(frozen=True)
class PlannedSend:
    """Positions [token_start, token_start + num_tokens) of a request, every layer of them, to `peer`."""

    request_id: str
    peer: str
    token_start: int
    num_tokens: int
    source: BatchRows | CachedSlots | CacheBlocks


def plan_from_batch(
    scheduled: Sequence[ScheduledRequest], plans: Mapping[str, SendPlan], block_size: int
) -> list[PlannedSend]:
    """This step's sends as tensors: a cached prefix from the KV cache, then the chunk's rows of the batch."""
    sends = []
    row = 0
    for s in scheduled:
        n = len(s.token_ids)
        plan = plans.get(s.request_id)
        if plan is not None:
            if plan.sent_until < s.start_pos:
                positions = range(plan.sent_until, s.start_pos)
                slots = [s.block_ids[p // block_size] * block_size + p % block_size for p in positions]
                sends.append(PlannedSend(s.request_id, plan.peer, plan.sent_until, len(slots), CachedSlots(slots)))
            first = max(s.start_pos, plan.token_start)
            lo, hi = row + first - s.start_pos, row + n
            if hi > lo:
                sends.append(PlannedSend(s.request_id, plan.peer, first, hi - lo, BatchRows(lo, hi)))
            plan.sent_until = s.start_pos + n
        row += n
    return sends


def plan_from_cache(
    scheduled: Sequence[ScheduledRequest], plans: Mapping[str, SendPlan], block_size: int, max_source_blocks: int
) -> list[PlannedSend]:
    """This step's sends as blocks of a shared KV cache, each spanning at most `max_source_blocks` blocks."""
    if max_source_blocks < 2:
        raise ValueError(f"max_source_blocks must be at least 2, got {max_source_blocks}")
    step = (max_source_blocks - 1) * block_size  # tokens starting mid-block span one block more
    sends = []
    for s in scheduled:
        plan = plans.get(s.request_id)
        if plan is None:
            continue
        start, end = max(plan.sent_until, plan.token_start), s.start_pos + len(s.token_ids)
        plan.sent_until = end
        for lo in range(start, end, step):
            sends.append(PlannedSend(s.request_id, plan.peer, lo, min(step, end - lo), CacheBlocks(s.block_ids)))
    return sends
