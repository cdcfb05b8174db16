"""Chunked prefill beside running decodes: a long prompt arriving is cut to `prefill_tokens_with_decodes`
tokens per step while requests decode, and takes the whole token budget when none does. Pure Python."""

from __future__ import annotations

from services.engine.block_manager import BlockManager
from services.engine.config import SchedulerConfig
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput


def _scheduler(cap: int, budget: int = 512) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, prefill_tokens_with_decodes=cap)
    return Scheduler(config, BlockManager(256, 16), max_model_len=4096)


def _add(s: Scheduler, rid: str, n: int, first: int) -> None:
    s.add_request(Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=50, ignore_eos=True), (0,)))


def _step(s: Scheduler) -> dict[str, int]:
    out: SchedulerOutput = s.schedule()
    s.update_from_output(out, RunnerOutput(sampled={x.request_id: 5 for x in out.scheduled if x.sample}))
    s.kv.check_integrity()
    return {x.request_id: len(x.token_ids) for x in out.scheduled}


def test_a_long_prompt_beside_decodes_is_cut_to_the_cap() -> None:
    s = _scheduler(cap=128)
    _add(s, "a", 40, 1000)
    _add(s, "b", 30, 2000)
    assert _step(s) == {"a": 40, "b": 30}  # nothing decodes yet: whole prompts
    _add(s, "long", 1000, 3000)
    steps = [_step(s) for _ in range(8)]
    assert all(st["a"] == 1 and st["b"] == 1 for st in steps)  # the decodes go on every step
    assert [st["long"] for st in steps] == [128] * 7 + [104]
    assert _step(s) == {"a": 1, "b": 1, "long": 1}


def test_without_decodes_a_prompt_takes_the_whole_budget() -> None:
    s = _scheduler(cap=128)
    _add(s, "long", 1000, 3000)
    assert [_step(s)["long"] for _ in range(2)] == [512, 488]


def test_cap_zero_keeps_the_whole_budget_beside_decodes() -> None:
    s = _scheduler(cap=0)
    _add(s, "a", 40, 1000)
    _step(s)
    _add(s, "long", 1000, 3000)
    assert _step(s) == {"a": 1, "long": 511}


def test_the_cap_spans_every_prefill_of_a_step() -> None:
    s = _scheduler(cap=100)
    _add(s, "a", 10, 1000)
    _step(s)
    _add(s, "p", 70, 2000)
    _add(s, "q", 70, 3000)
    assert _step(s) == {"a": 1, "p": 70, "q": 30}
    assert _step(s) == {"a": 1, "p": 1, "q": 40}
