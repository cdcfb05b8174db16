"""Scheduler: token budget, chunked prefill, decode-first order, max_num_seqs, preemption, priority, abort.

Pure Python: the "model" is a fake RunnerOutput that samples a fixed token for every request due one.
"""

from __future__ import annotations

import zlib

import pytest

from services.engine.block_manager import BlockManager
from services.engine.config import SchedulerConfig
from services.engine.logprobs import TokenLogprob
from services.engine.request import Request, RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RequestOutput, RunnerOutput, Scheduler, SchedulerOutput

BS = 4
TOKEN = 7
EOS = 99


def make(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16, chunked: bool = True) -> Scheduler:
    """A scheduler whose context length is what its pool holds, as LLMEngine guarantees."""
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(config, BlockManager(num_blocks, BS), max_model_len=num_blocks * BS)


def prompt(rid: str, n: int) -> list[int]:
    """Distinct per request id, so requests share no prefix unless a test says so."""
    base = 1000 + zlib.crc32(rid.encode()) % 10_000 * 100
    return [base + i for i in range(n)]


def add(s: Scheduler, rid: str, prompt_len: int, max_tokens: int = 4, priority: int = 0, arrival: float = 0.0,
        **params: object) -> Request:
    r = Request(rid, prompt(rid, prompt_len), SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
                eos_token_ids=(EOS,), priority=priority, arrival_time=arrival)
    s.add_request(r)
    return r


def step(s: Scheduler, token: int = TOKEN) -> tuple[SchedulerOutput, list[RequestOutput]]:
    out = s.schedule()
    fake = RunnerOutput(sampled={x.request_id: token for x in out.scheduled if x.sample})
    return out, s.update_from_output(out, fake)


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(x.request_id, x.start_pos, len(x.token_ids), x.sample) for x in out.scheduled]


def drain(s: Scheduler, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not s.requests:
            break
        step(s)
        s.kv.check_integrity()
    assert not s.requests
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_whole_prompts_fill_the_budget_and_the_rest_is_chunked() -> None:
    s = make(budget=16)
    for i in range(3):
        add(s, f"r{i}", 10, arrival=i)
    out, outputs = step(s)
    assert plan(out) == [("r0", 0, 10, True), ("r1", 0, 6, False)]
    assert out.num_tokens == 16
    assert [o.request_id for o in outputs] == ["r0"]
    out, _ = step(s)
    # decode of r0 first, then the rest of r1's prompt, then r2's whole prompt in what is left
    assert plan(out) == [("r0", 10, 1, True), ("r1", 6, 4, True), ("r2", 0, 10, True)]
    assert out.num_tokens == 15
    drain(s)


def test_long_prompt_runs_in_budget_sized_chunks() -> None:
    s = make(budget=16)
    r = add(s, "long", 40)
    chunks = [plan(step(s)[0]) for _ in range(3)]
    assert chunks == [[("long", 0, 16, False)], [("long", 16, 16, False)], [("long", 32, 8, True)]]
    assert r.output_token_ids == [TOKEN]
    assert r.num_computed_tokens == 40
    drain(s)


def test_without_chunking_a_prompt_waits_for_a_step_with_room() -> None:
    s = make(budget=16, chunked=False)
    add(s, "a", 10, arrival=0)
    add(s, "b", 10, arrival=1)
    out, _ = step(s)
    assert plan(out) == [("a", 0, 10, True)]
    out, _ = step(s)
    assert plan(out) == [("a", 10, 1, True), ("b", 0, 10, True)]
    drain(s)


def test_without_chunking_a_prompt_over_the_budget_is_never_split() -> None:
    s = make(budget=16, chunked=False)
    add(s, "huge", 20)
    out, _ = step(s)
    assert out.scheduled == []


def test_decodes_go_before_new_prefill() -> None:
    s = make(budget=8)
    add(s, "d1", 3, max_tokens=10, arrival=0)
    add(s, "d2", 3, max_tokens=10, arrival=1)
    step(s)
    add(s, "p", 30, arrival=2)
    out, _ = step(s)
    assert plan(out) == [("d1", 3, 1, True), ("d2", 3, 1, True), ("p", 0, 6, False)]
    drain(s)


def test_max_num_seqs_caps_the_running_batch() -> None:
    s = make(max_num_seqs=2)
    for i in range(3):
        add(s, f"r{i}", 4, max_tokens=2, arrival=i)
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["r0", "r1"]
    assert len(s.running) == 2 and [r.request_id for r in s.waiting] == ["r2"]
    out, outputs = step(s)  # r0 and r1 reach max_tokens=2 and finish
    assert all(o.finished and o.finish_reason == "length" for o in outputs)
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["r2"]
    assert out.finished_ids == ["r0", "r1"]
    drain(s)


def test_priority_orders_admission_lower_value_first_then_fcfs() -> None:
    s = make(max_num_seqs=1)
    add(s, "late-high", 4, max_tokens=1, priority=0, arrival=5)
    add(s, "low", 4, max_tokens=1, priority=3, arrival=0)
    add(s, "early-high", 4, max_tokens=1, priority=0, arrival=1)
    order = [step(s)[0].scheduled[0].request_id for _ in range(3)]
    assert order == ["early-high", "late-high", "low"]
    drain(s)


def test_out_of_blocks_preempts_the_newest_and_recomputes_it() -> None:
    s = make(num_blocks=4, budget=64)
    old = add(s, "old", 7, max_tokens=6, arrival=0)
    new = add(s, "new", 7, max_tokens=6, arrival=1)
    step(s)  # prompts computed: positions 0..6, two blocks each: the pool is full
    step(s)  # position 7 still fits the second block
    assert s.num_preemptions == 0
    out, _ = step(s)  # position 8 needs a third block each: the newest gives way
    assert out.preempted_ids == ["new"]
    assert [x.request_id for x in out.scheduled] == ["old"]
    assert new.status == RequestStatus.PREEMPTED
    assert new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert s.num_preemptions == 1
    assert "new" not in s.kv.req_blocks
    assert [r.request_id for r in s.waiting] == ["new"]
    s.kv.check_integrity()
    while not old.is_finished:
        step(s)
    out, _ = step(s)
    # Readmitted: everything not in the prefix cache is recomputed, its generated tokens included.
    (resumed,) = out.scheduled
    assert resumed.request_id == "new" and resumed.sample
    assert resumed.start_pos % BS == 0 and resumed.start_pos < 8
    assert resumed.token_ids == new.all_token_ids[resumed.start_pos : -1]  # [-1]: sampled by this step
    assert resumed.num_generated == 2
    drain(s)
    assert new.output_token_ids == [TOKEN] * 6


def test_preemption_picks_the_lowest_priority_even_if_older() -> None:
    s = make(num_blocks=4, budget=64)
    low = add(s, "low", 7, max_tokens=6, priority=5, arrival=0)
    add(s, "high", 7, max_tokens=6, priority=0, arrival=1)
    step(s)
    step(s)
    out, _ = step(s)
    assert out.preempted_ids == ["low"]
    assert [x.request_id for x in out.scheduled] == ["high"]
    assert low.status == RequestStatus.PREEMPTED
    drain(s)


def test_the_newest_request_preempts_itself_when_it_cannot_grow() -> None:
    s = make(num_blocks=4, budget=64)
    add(s, "a", 6, max_tokens=8, arrival=0)  # positions 0..5 of blocks 0-1: room up to position 7
    b = add(s, "b", 8, max_tokens=8, arrival=1)  # positions 0..7: two full blocks
    step(s)
    out, _ = step(s)  # a fits; b needs a fifth block and is itself the newest
    assert out.preempted_ids == ["b"]
    assert [x.request_id for x in out.scheduled] == ["a"]
    assert b.status == RequestStatus.PREEMPTED
    s.kv.check_integrity()
    drain(s)


def test_no_admission_in_a_step_that_preempted() -> None:
    s = make(num_blocks=4, budget=64)
    add(s, "a", 7, max_tokens=6, arrival=0)
    add(s, "b", 7, max_tokens=6, arrival=1)
    step(s)
    step(s)
    add(s, "c", 1, max_tokens=1, arrival=2)
    out, _ = step(s)
    assert out.preempted_ids == ["b"]
    assert "c" not in [x.request_id for x in out.scheduled]
    drain(s)


def test_abort_frees_blocks_and_is_reported_to_the_runner() -> None:
    s = make()
    add(s, "a", 10, max_tokens=50, arrival=0)
    add(s, "w", 10, max_tokens=50, arrival=1)
    step(s)
    assert s.kv.num_used_blocks > 0
    s.finish_requests(["a", "w", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == s.kv.num_blocks
    s.kv.check_integrity()
    out, _ = step(s)
    assert out.scheduled == [] and sorted(out.finished_ids) == ["a", "w"]
    assert s.num_unfinished == 0


def test_abort_of_a_waiting_request() -> None:
    s = make(max_num_seqs=1)
    add(s, "run", 4, max_tokens=50, arrival=0)
    w = add(s, "wait", 4, arrival=1)
    step(s)
    s.finish_requests(["wait"], RequestStatus.FINISHED_ABORTED)
    assert w.status == RequestStatus.FINISHED_ABORTED and s.waiting == []


def test_abort_while_the_step_runs_drops_its_token() -> None:
    s = make()
    r = add(s, "a", 5, max_tokens=50)
    out = s.schedule()
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    outputs = s.update_from_output(out, RunnerOutput(sampled={"a": TOKEN}))
    assert outputs == [] and r.output_token_ids == []
    assert s.kv.num_free_blocks == s.kv.num_blocks
    s.kv.check_integrity()


@pytest.mark.parametrize(
    ("params", "token", "reason"),
    [
        ({}, EOS, "stop"),
        ({"ignore_eos": True}, EOS, "length"),
        ({"stop_token_ids": [TOKEN]}, TOKEN, "stop"),
        ({}, TOKEN, "length"),
    ],
)
def test_finish_reasons(params: dict[str, object], token: int, reason: str) -> None:
    s = make()
    add(s, "a", 3, max_tokens=3, **params)
    outputs: list[RequestOutput] = []
    while s.requests:
        outputs += step(s, token)[1]
    assert outputs[-1].finished and outputs[-1].finish_reason == reason
    assert len(outputs) == (1 if reason == "stop" else 3)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_max_model_len_ends_a_request() -> None:
    s = make(num_blocks=2)
    add(s, "a", 4, max_tokens=100)
    outputs: list[RequestOutput] = []
    while s.requests:
        outputs += step(s)[1]
    assert outputs[-1].finish_reason == "length" and outputs[-1].num_output_tokens == 4
    assert s.kv.num_free_blocks == 2


def test_prefix_hit_is_reported_as_cached_tokens() -> None:
    s = make(budget=64)
    s.add_request(Request("first", list(range(10)), SamplingParams(max_tokens=1)))
    drain(s)
    s.add_request(Request("second", list(range(10)), SamplingParams(max_tokens=1)))
    out, outputs = step(s)
    assert plan(out) == [("second", 8, 2, True)]
    assert outputs[0].num_cached_tokens == 8
    drain(s)


def test_illegal_transition_is_refused() -> None:
    r = Request("x", [1], SamplingParams())
    with pytest.raises(AssertionError, match="illegal transition"):
        r.transition(RequestStatus.PREEMPTED)
    r.transition(RequestStatus.RUNNING)
    r.transition(RequestStatus.FINISHED_LENGTH)
    assert r.is_finished and r.status.finish_reason == "length"


def test_remote_kv_reservation_then_decode() -> None:
    s = make(num_blocks=8)
    r = Request("remote", list(range(9)), SamplingParams(max_tokens=3))
    assert s.reserve_remote(r) == 0
    assert r.status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert len(s.kv.block_ids("remote")) == 3
    out = s.finish_remote("remote", TOKEN)
    assert out[0].new_token_ids == [TOKEN] and r.status == RequestStatus.RUNNING
    out2, _ = step(s)
    assert plan(out2) == [("remote", 9, 1, True)]
    drain(s)
    big = Request("big", list(range(40)), SamplingParams(max_tokens=3))
    assert s.reserve_remote(big) == -1


# ---- logprobs -----------------------------------------------------------------------------------------------


def fake_logprobs_runner(out: SchedulerOutput) -> RunnerOutput:
    """Samples TOKEN; a logprob whose value is -(position it is for), so a misplaced entry shows."""
    result = RunnerOutput()
    for x in out.scheduled:
        end = x.start_pos + len(x.token_ids)
        if x.sample:
            result.sampled[x.request_id] = TOKEN
            if x.sampling_params.logprobs is not None:
                result.logprobs[x.request_id] = TokenLogprob(TOKEN, -float(end), 1)
        if x.prompt_logprobs:
            targets = x.prompt_token_ids[x.start_pos + 1 : end + 1]
            result.prompt_logprobs[x.request_id] = [
                TokenLogprob(t, -float(x.start_pos + 1 + j), 1) for j, t in enumerate(targets)
            ]
    return result


def expected_prompt_logprobs(prompt_ids: list[int]) -> list[TokenLogprob | None]:
    return [None] + [TokenLogprob(t, -float(i), 1) for i, t in enumerate(prompt_ids) if i > 0]


def run_with_logprobs(s: Scheduler, max_steps: int = 200) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not s.requests:
            break
        out = s.schedule()
        for o in s.update_from_output(out, fake_logprobs_runner(out)):
            outputs.setdefault(o.request_id, []).append(o)
        s.kv.check_integrity()
    assert not s.requests and s.kv.num_free_blocks == s.kv.num_blocks
    return outputs


def test_scheduled_requests_carry_what_the_sampler_reads() -> None:
    s = make()
    r = add(s, "a", 5, max_tokens=3, prompt_logprobs=2)
    (x,) = s.schedule().scheduled
    assert x.prompt_token_ids is r.prompt_token_ids and x.output_token_ids is r.output_token_ids
    assert x.eos_token_ids == (EOS,) and x.prompt_logprobs


def test_prompt_logprobs_gather_over_chunks_and_come_with_the_first_output_only() -> None:
    s = make(budget=6)
    r = add(s, "a", 17, max_tokens=3, prompt_logprobs=1, logprobs=0)
    plain = add(s, "b", 3, max_tokens=3, arrival=1)
    outputs = run_with_logprobs(s)
    first, *rest = outputs["a"]
    assert first.prompt_logprobs == expected_prompt_logprobs(r.prompt_token_ids)
    assert all(o.prompt_logprobs is None for o in rest)
    assert [o.logprobs for o in outputs["a"]] == [[TokenLogprob(TOKEN, -float(17 + i), 1)] for i in range(3)]
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in outputs["b"])
    assert plain.prompt_logprobs is None and r.prompt_logprobs is None  # handed out, not kept


def test_prompt_logprobs_survive_a_preemption_mid_prompt_without_duplicates() -> None:
    s = make(num_blocks=4, budget=8)
    add(s, "a", 6, max_tokens=6, arrival=0)
    b = add(s, "b", 11, max_tokens=2, arrival=1, prompt_logprobs=0)
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(2):  # a's prompt and 2 of b's tokens; then b's next chunk finds no block and b gives way
        out = s.schedule()
        for o in s.update_from_output(out, fake_logprobs_runner(out)):
            outputs.setdefault(o.request_id, []).append(o)
    assert out.preempted_ids == ["b"] and b.num_computed_tokens == 0
    assert b.prompt_logprobs is not None and len(b.prompt_logprobs) == 3  # None and tokens 1, 2
    outputs.update(run_with_logprobs(s))  # b's recompute covers tokens 1..8 in one chunk: 1 and 2 are not added again
    assert outputs["b"][0].prompt_logprobs == expected_prompt_logprobs(b.prompt_token_ids)


def test_a_request_with_prompt_logprobs_takes_no_prefix_hit_but_fills_the_cache() -> None:
    s = make(budget=64)
    s.add_request(Request("first", list(range(10)), SamplingParams(max_tokens=1, prompt_logprobs=0)))
    run_with_logprobs(s)
    again = Request("again", list(range(10)), SamplingParams(max_tokens=1, prompt_logprobs=0))
    s.add_request(again)
    out = s.schedule()
    assert plan(out) == [("again", 0, 10, True)]
    outputs = s.update_from_output(out, fake_logprobs_runner(out))
    assert outputs[0].num_cached_tokens == 0
    assert outputs[0].prompt_logprobs == expected_prompt_logprobs(again.prompt_token_ids)
    s.add_request(Request("plain", list(range(10)), SamplingParams(max_tokens=1)))
    out, outputs = step(s)
    assert plan(out) == [("plain", 8, 2, True)] and outputs[0].num_cached_tokens == 8
    drain(s)


def test_a_remote_request_reports_logprobs_after_its_first_token() -> None:
    s = make(num_blocks=8)
    r = Request("remote", list(range(9)), SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1))
    assert s.reserve_remote(r) == 0
    (out,) = s.finish_remote("remote", TOKEN)
    assert out.prompt_logprobs is None  # the prefill side reported those, and the first token's logprob
    outputs = run_with_logprobs(s)
    assert [o.logprobs for o in outputs["remote"]] == [[TokenLogprob(TOKEN, -10.0, 1)], [TokenLogprob(TOKEN, -11.0, 1)]]
    plain = Request("plain", list(range(9)), SamplingParams(max_tokens=1))
    assert s.reserve_remote(plain) >= 0
    assert s.finish_remote("plain", TOKEN)[0].logprobs is None
