"""Continuous batching with stall-free chunked prefill (Sarathi-Serve style). Pure Python.

Each step gets a token budget. Running requests go first (their decodes, and the next chunk
of any prefill in progress), then waiting requests fill what is left, a prompt possibly split
across steps. When blocks run out, the newest lowest-priority running request is preempted
and later recomputed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager, ComputedBlocks
from services.engine.config import SchedulerConfig
from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.engine.request import Request, RequestStatus
from services.engine.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """What the runner needs for one request in one step.

    The runner computes token_ids at positions [start_pos, start_pos + len(token_ids)) and
    samples a token after the last of them when `sample` is set. The token lists and EOS ids are
    the request's own (references, not copies: the sampler's penalties and min_tokens read them,
    nothing writes them during the step). With `prompt_logprobs` set the runner also reports the
    logprobs of the prompt tokens the chunk's rows predict (see RunnerOutput).
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    num_generated: int  # tokens generated so far (for per-request seeded sampling)
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: tuple[int, ...] = ()
    prompt_logprobs: bool = False


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # since the last step; the runner drops their state

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


@dataclass
class RunnerOutput:
    """Sampled token per request that had `sample` set, and the logprobs that were asked for.

    `logprobs` holds the sampled token's TokenLogprob for requests whose params.logprobs is set.
    `prompt_logprobs` holds, for requests scheduled with prompt_logprobs, one entry per row of the
    chunk that predicts a prompt token; entry j belongs to prompt token start_pos + 1 + j:

        rows computed:   start_pos    start_pos+1  ...  start_pos+n-1
        token predicted: start_pos+1  start_pos+2  ...  start_pos+n     (kept while < num_prompt_tokens)
    """

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for logprobs
    prompt_logprobs: PromptLogprobs | None = None  # on the request's first output, when it asked for them
    # Set by AsyncEngine: how long the step that produced this output took, and when it ended (time.time()).
    step_seconds: float = 0.0
    produced_at: float = 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.kv = block_manager
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # in admission order
        self.remote: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KV
        self.finished_ids: list[str] = []
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def reserve_remote(self, request: Request) -> int:
        """Decode side of a hand-off: allocate the prompt's blocks now; KV arrives later.

        Returns how many leading prompt tokens the local prefix cache already holds
        (the prefill side need not send them). False from the block manager means no room.
        """
        computed = self.kv.get_computed_blocks(request)
        if not self.kv.allocate_slots(request, request.num_prompt_tokens - computed.num_tokens, computed):
            return -1
        request.num_cached_tokens = computed.num_tokens
        request.transition(RequestStatus.WAITING_FOR_REMOTE_KV)
        self.requests[request.request_id] = request
        self.remote[request.request_id] = request
        return computed.num_tokens

    def finish_remote(self, request_id: str, first_token: int) -> list[RequestOutput]:
        """The request's prompt KV has arrived with the first sampled token: it joins the running batch.
        That token's logprob and the prompt logprobs, if asked for, reached the router from the prefill side."""
        request = self.remote.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        request.prompt_logprobs = None
        self.kv.cache_full_blocks(request, request.num_computed_tokens)
        request.transition(RequestStatus.RUNNING)
        self.running.append(request)
        return [self._append_token(request, first_token)]

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished:
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self.remote.pop(rid, None)
            self._finish(request, status)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self.finished_ids)
        self.finished_ids = []
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        prefill_budget = self._prefill_budget(budget)
        scheduled_ids: set[str] = set()

        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = request.num_tokens - request.num_computed_tokens
            if num_new > budget and not chunked:
                continue
            num_new = min(num_new, budget) if num_new == 1 or not chunked else min(num_new, budget, prefill_budget)
            if num_new == 0:
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = max((r for r in self.running if r.request_id not in scheduled_ids), key=lambda r: r.sort_key)
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            out.scheduled.append(self._scheduled(request, num_new))
            scheduled_ids.add(request.request_id)
            budget -= num_new
            prefill_budget -= num_new if num_new > 1 else 0

        while self.waiting and budget > 0 and not out.preempted_ids and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed = self._computed_blocks(request)
            num_new = request.num_tokens - computed.num_tokens
            if num_new > budget and not chunked:
                break
            num_new = min(num_new, budget, prefill_budget) if chunked else num_new
            if num_new == 0 or not self.kv.allocate_slots(request, num_new, computed):
                break
            self.waiting.pop(0)
            request.num_computed_tokens = computed.num_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = computed.num_tokens
            request.transition(RequestStatus.RUNNING)
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            prefill_budget -= num_new
        return out

    def _prefill_budget(self, budget: int) -> int:
        """Prompt tokens this step may prefill: the whole budget, but `prefill_tokens_with_decodes` while
        a running request decodes (Sarathi-Serve's stall-free batching: a long prompt arriving is cut into
        chunks that keep the decodes' inter-token latency steady)."""
        cap = self.config.prefill_tokens_with_decodes
        decoding = any(r.status == RequestStatus.RUNNING and r.num_tokens - r.num_computed_tokens == 1
                       for r in self.running)
        return min(budget, cap) if cap and decoding else budget

    def _computed_blocks(self, request: Request) -> ComputedBlocks:
        """Prefix-cache hits; none while a request collects prompt logprobs, which need the logits of
        every prompt position (it still fills the cache for others)."""
        if request.prompt_logprobs is not None:
            return ComputedBlocks([], 0)
        return self.kv.get_computed_blocks(request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        recorded = request.prompt_logprobs
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new],
            start_pos=start,
            block_ids=list(self.kv.block_ids(request.request_id)),
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            num_generated=len(request.output_token_ids),
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            eos_token_ids=request.eos_token_ids,
            prompt_logprobs=(
                recorded is not None and len(recorded) < request.num_prompt_tokens and start + num_new >= len(recorded)
            ),
        )

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.transition(RequestStatus.PREEMPTED)
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for s in sched.scheduled:
            request = self.requests.get(s.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            chunk = result.prompt_logprobs.get(s.request_id)
            if chunk is not None:
                _record_prompt_logprobs(request, s.start_pos, chunk)
            request.num_computed_tokens += len(s.token_ids)
            self.kv.cache_full_blocks(request, request.num_computed_tokens)
            token = result.sampled.get(s.request_id)
            if token is not None:
                outputs.append(self._append_token(request, token, result.logprobs.get(s.request_id)))
        return outputs

    def _append_token(self, request: Request, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None  # the first output carries them
        request.output_token_ids.append(token)
        stop = request.check_stop(self.max_model_len)
        if stop is not None:
            self.running.remove(request)
            self._finish(request, stop)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token],
            finished=request.is_finished,
            finish_reason=request.status.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            num_output_tokens=len(request.output_token_ids),
            logprobs=[logprob] if logprob is not None and request.sampling_params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
        )

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.transition(status)
        self.kv.free(request.request_id)
        self.requests.pop(request.request_id, None)
        self.finished_ids.append(request.request_id)

    # ---- introspection ------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    @property
    def queued_prefill_tokens(self) -> int:
        waiting = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        return waiting + sum(r.num_tokens - r.num_computed_tokens - 1 for r in self.running)


def _record_prompt_logprobs(request: Request, start_pos: int, chunk: list[TokenLogprob]) -> None:
    """Appends a chunk's prompt logprobs (entry j: prompt token start_pos + 1 + j) to the request's,
    skipping positions already recorded (a preempted request computes its prompt again)."""
    recorded = request.prompt_logprobs
    if recorded is None:
        return
    skip = len(recorded) - (start_pos + 1)
    assert skip >= 0, f"request {request.request_id}: prompt logprobs from {start_pos + 1}, recorded to {len(recorded)}"
    recorded.extend(chunk[skip:])
