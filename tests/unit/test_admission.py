"""Admission control and deadlines (services/router/admission.py): the pure rules, the asyncio account, and the
Router over stand-in workers (overload refused at once, queued requests served in order, deadlines that cancel the
work and free its KV). The served twins are in tests/service/test_admission_served.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.router.admission import (
    Admission,
    AdmissionLimits,
    Deadline,
    DeadlineExceeded,
    Load,
    Overloaded,
    Ticket,
    Verdict,
    capacity_tokens,
    decide,
    fits,
    kv_capacity,
    kv_need,
    parse_timeout,
)
from services.router.config import RouterConfig
from services.router.messages import Chunk, Completion, GenerateInput
from services.router.metrics import Metrics
from services.router.pool import WorkerHandle
from services.router.router import Router
from services.transfer.config import TransferConfig
from services.worker.messages import PrefillResult, Reservation, TokenBatch, WorkerInfo
from tests.token_worker import serving_ready

LIMITS = AdmissionLimits(max_queued_requests=2, kv_overcommit=1.0)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    text = metrics.render().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- the pure rules ---------------------------------------------------------------------------------------


def test_kv_need_is_the_prompt_plus_every_output_at_its_longest() -> None:
    assert kv_need(100, SamplingParams(max_tokens=50), 2048) == 150
    assert kv_need(100, SamplingParams(max_tokens=50, n=3), 2048) == 250  # the outputs share the prompt
    assert kv_need(100, SamplingParams(max_tokens=None), 2048) == 2048  # unset: the rest of the context


def test_kv_capacity_counts_routable_decode_workers_only() -> None:
    def worker(alive: bool, draining: bool = False, blocks: int | None = 10) -> WorkerHandle:
        info = None if blocks is None else WorkerInfo("d", "decode", "a", 16, blocks)
        return WorkerHandle("d", "decode", None, info=info, alive=alive, draining=draining)

    assert kv_capacity([worker(True), worker(True, blocks=5), worker(False), worker(True, True)]) == 15 * 16
    assert kv_capacity([worker(True, blocks=None)]) == 0
    assert kv_capacity([]) == 0


def test_capacity_is_scaled_by_the_overcommit_and_absent_without_workers() -> None:
    assert capacity_tokens(1000, LIMITS) == 1000
    assert capacity_tokens(1000, AdmissionLimits(2, 1.5)) == 1500
    assert capacity_tokens(1000, AdmissionLimits(2, 0.0)) is None  # KV admission off
    assert capacity_tokens(0, LIMITS) is None  # no routable decode worker: the dispatch answers UNAVAILABLE


def test_a_request_fits_beside_the_admitted_ones_or_alone() -> None:
    assert fits(Load(1, 600, 0), 400, 1000)
    assert not fits(Load(1, 600, 0), 401, 1000)
    assert fits(Load(0, 0, 0), 5000, 1000)  # alone it always runs: the engine's KV holds max_model_len
    assert fits(Load(9, 10**6, 0), 10**6, None)


def test_decide_admits_queues_then_refuses() -> None:
    assert decide(Load(1, 600, 0), 400, 1000, LIMITS) is Verdict.ADMIT
    assert decide(Load(1, 600, 0), 500, 1000, LIMITS) is Verdict.QUEUE
    assert decide(Load(1, 600, 1), 100, 1000, LIMITS) is Verdict.QUEUE  # it fits, but another came first
    assert decide(Load(1, 600, 2), 100, 1000, LIMITS) is Verdict.REJECT
    assert decide(Load(1, 600, 0), 500, 1000, AdmissionLimits(0, 1.0)) is Verdict.REJECT
    assert decide(Load(1, 600, 10**6), 500, 1000, AdmissionLimits(-1, 1.0)) is Verdict.QUEUE


def test_parse_timeout() -> None:
    assert parse_timeout(None) is None
    assert parse_timeout("2.5") == 2.5
    for bad in ("", "soon", "0", "-1", "inf", "nan"):
        with pytest.raises(InvalidRequest, match="X-Request-Timeout"):
            parse_timeout(bad)


def test_the_shortest_timeout_is_the_deadline() -> None:
    assert Deadline.within(None, None).at is None and Deadline.within().remaining() is None
    d = Deadline.within(None, 30.0, 2.0)
    assert d.timeout_s == 2.0
    assert d.remaining() is not None and 0 < d.remaining() <= 2.0  # type: ignore[operator]
    assert "deadline of 2 s passed while it ran" in str(d.exceeded("while it ran"))


def test_router_config_checks_the_admission_fields() -> None:
    for bad in ({"max_queued_requests": -2}, {"kv_overcommit": -0.5}, {"request_timeout_s": 0.0}):
        with pytest.raises(ValueError):
            RouterConfig(**bad)  # type: ignore[arg-type]


# ---- the account ------------------------------------------------------------------------------------------


def _admission(capacity: Callable[[], int], queued: int = 2, timeout_s: float | None = None) -> Admission:
    config = RouterConfig(max_queued_requests=queued, request_timeout_s=timeout_s)
    return Admission(config, capacity, Metrics(model_name="m"))


async def _admitted(admission: Admission, need: int, timeout_s: float | None = None) -> Ticket:
    ticket = admission.ticket(need, timeout_s)
    await admission.admit(ticket)
    return ticket


async def test_waiters_are_admitted_in_order_as_the_admitted_end() -> None:
    admission = _admission(lambda: 1000)
    first = await _admitted(admission, 600)
    big = asyncio.ensure_future(_admitted(admission, 500))
    small = asyncio.ensure_future(_admitted(admission, 100))  # would fit now, but waits behind `big`
    await asyncio.sleep(0)
    assert admission.load == Load(1, 600, 2)
    refused = admission.ticket(1, None)
    with pytest.raises(Overloaded, match="overloaded"):
        await admission.admit(refused)
    admission.release(refused)  # never admitted: nothing to give back
    assert isinstance(Overloaded("x"), ResourceExhausted)  # so both front ends answer 429 / RESOURCE_EXHAUSTED
    assert _value(admission.metrics, "pdserve_request_failures_total", reason="resource_exhausted") == 1
    assert _value(admission.metrics, "pdserve_router_queued_requests") == 2
    admission.release(first)
    tickets = await asyncio.wait_for(asyncio.gather(big, small), 5)
    assert admission.load == Load(2, 600, 0)
    for ticket in tickets:
        admission.release(ticket)
    admission.release(tickets[0])  # twice is once
    assert admission.load == Load(0, 0, 0)
    assert _value(admission.metrics, "pdserve_router_admitted_kv_tokens") == 0
    assert _value(admission.metrics, "pdserve_router_kv_capacity_tokens") == 1000


async def test_a_request_the_queue_would_outlast_is_refused_at_once() -> None:
    admission = _admission(lambda: 1000, queued=10)
    running = await _admitted(admission, 1000)
    queued = [asyncio.ensure_future(_admitted(admission, 1000)) for _ in range(2)]
    await asyncio.sleep(0)
    assert admission.end_interval is None  # nothing has ended yet: no estimate, nobody is refused for it
    admission.release(running)  # the first end while others wait starts the clock
    await asyncio.sleep(0.2)
    first = await asyncio.wait_for(queued[0], 5)
    admission.release(first)  # 0.2 s later: the queue moves about one request per 0.2 s
    second = await asyncio.wait_for(queued[1], 5)
    assert admission.end_interval is not None and admission.end_interval >= 0.2
    waiting = asyncio.ensure_future(_admitted(admission, 1000))  # no deadline: it waits
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="would take about"):  # 2 ahead of it by then: about 0.4 s, past 0.1 s
        await admission.admit(admission.ticket(1000, 0.1))
    assert admission.load.queued == 1
    patient = asyncio.ensure_future(_admitted(admission, 1000, 30.0))  # 30 s is enough: it waits
    await asyncio.sleep(0)
    assert admission.load.queued == 2
    admission.release(second)
    admission.release(await asyncio.wait_for(waiting, 5))
    admission.release(await asyncio.wait_for(patient, 5))
    assert admission.load == Load(0, 0, 0)


async def test_a_waiter_leaves_the_queue_at_its_deadline_or_cancellation() -> None:
    admission = _admission(lambda: 1000, timeout_s=30.0)
    held = await _admitted(admission, 900)
    with pytest.raises(DeadlineExceeded, match="deadline of 0.05 s passed while it waited for admission"):
        await _admitted(admission, 500, 0.05)
    assert _value(admission.metrics, "pdserve_request_deadline_exceeded_total", stage="admission") == 1
    waiting = asyncio.ensure_future(_admitted(admission, 500))
    await asyncio.sleep(0)
    assert admission.load.queued == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert admission.load == Load(1, 900, 0)
    admission.release(held)
    assert admission.load == Load(0, 0, 0)


async def test_a_waiter_is_admitted_when_the_pool_grows() -> None:
    capacity = [1000]
    admission = _admission(lambda: capacity[0])
    await _admitted(admission, 900)
    waiting = asyncio.ensure_future(_admitted(admission, 500))
    await asyncio.sleep(0)
    assert not waiting.done()
    capacity[0] = 2000  # a decode worker came back: no release wakes the waiter, its recheck does
    await asyncio.wait_for(waiting, 5)
    assert admission.load == Load(2, 1400, 0)


async def test_until_raises_at_the_deadline() -> None:
    admission = _admission(lambda: 0, timeout_s=0.05)
    assert admission.ticket(1, 9.0).deadline.timeout_s == 0.05  # the server's default is the longest
    assert await admission.until(_admission(lambda: 0).ticket(1, None), asyncio.sleep(0, "done")) == "done"
    with pytest.raises(DeadlineExceeded, match="while it ran"):
        await admission.until(admission.ticket(1, None), asyncio.Event().wait())
    assert _value(admission.metrics, "pdserve_request_deadline_exceeded_total", stage="running") == 1


# ---- the Router over stand-in workers ---------------------------------------------------------------------


class Method:
    """An actor method: `.remote(*args)` runs `behaviour(*args)` as a task and records the call."""

    def __init__(self, behaviour: Callable[..., Any]) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        self.calls.append(args)
        return asyncio.ensure_future(self.behaviour(*args))


class Stream:
    """A decode worker's generate, served over a real TokenServer (tests/token_worker.py), whose batches wait for
    `go` after the first; `started` counts the streams."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = 0

    async def __call__(self, *_: Any) -> AsyncIterator[TokenBatch]:
        self.started += 1
        yield TokenBatch([8], False, None, 0, decode_start=time.time())
        await self.go.wait()
        yield TokenBatch([9], True, "length", 0)


async def _true(*_: Any) -> bool:
    return True


async def _reserve(rid: str, *_: Any) -> Reservation:
    return Reservation(rid, 0, 30.0)


async def _first_token(rid: str, *_: Any) -> PrefillResult:
    return PrefillResult(rid, first_token=7, finish_reason=None, cached_tokens=0, transfer_wait_s=0.0, bytes_sent=64)


def _router(tokenizer: Tokenizer, num_blocks: int, **config: Any) -> tuple[Router, SimpleNamespace]:
    decode = SimpleNamespace(abort=Method(_true), reserve=Method(_reserve), generate=Stream())
    prefill = SimpleNamespace(abort=Method(_true), prefill=Method(_first_token))
    workers = [WorkerHandle(f"{role}-0", role, actor, alive=True,
                            info=WorkerInfo(f"{role}-0", role, "127.0.0.1:1", 16, num_blocks))
               for role, actor in (("prefill", prefill), ("decode", decode))]
    decode.ready = Method(serving_ready(decode, workers[1].info))  # type: ignore[arg-type]
    pools = SimpleNamespace(prefill=workers[:1], decode=workers[1:], transfer_config=TransferConfig())
    router = Router(RouterConfig(local_prefill_threshold=0, **config), pools, tokenizer,  # type: ignore[arg-type]
                    Metrics(model_name="m"), tokenizer.vocab_size, 512, 16)
    return router, decode


def _input(rid: str, max_tokens: int = 100) -> GenerateInput:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return GenerateInput(request_id=rid, token_ids=list(range(10, 110)), params=params)


async def _drain(router: Router, inp: GenerateInput, timeout_s: float | None = None) -> list[Any]:
    return [event async for event in router.generate(inp, timeout_s)]


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


async def test_the_router_refuses_past_its_queue_at_once_and_serves_the_rest(tokenizer: Tokenizer) -> None:
    # 25 blocks of 16 = 400 tokens; each request needs 100 + 100: two run, one waits, the fourth is refused.
    router, decode = _router(tokenizer, num_blocks=25, max_queued_requests=1)
    running = [asyncio.ensure_future(_drain(router, _input(f"r{i}"))) for i in range(3)]
    await _until(lambda: decode.generate.started == 2 and router.admission.load.queued == 1)
    with pytest.raises(Overloaded, match="overloaded"):
        await _drain(router, _input("refused"))
    assert not any(task.done() for task in running)  # refused while the admitted ones still ran
    assert "refused" not in router.active
    decode.generate.go.set()
    results = await asyncio.wait_for(asyncio.gather(*running), 10)
    assert [r[-1].finish_reason for r in results] == ["length"] * 3
    assert decode.generate.started == 3
    assert router.admission.load == Load(0, 0, 0) and not router.active
    assert _value(router.metrics, "pdserve_request_failures_total", reason="resource_exhausted") == 1


async def test_a_deadline_cancels_the_request_and_frees_its_kv(tokenizer: Tokenizer) -> None:
    router, decode = _router(tokenizer, num_blocks=100, request_timeout_s=0.5)
    events: list[Any] = []
    with pytest.raises(DeadlineExceeded, match="deadline of 0.2 s passed while it ran"):
        async for event in router.generate(_input("late"), 0.2):  # shorter than the server's 0.5 s: it wins
            events.append(event)
    assert [e.token_ids for e in events if isinstance(e, Chunk)] == [[7], [8]]  # the stream had started
    assert [call[0] for call in decode.abort.calls] == ["late"]  # the decode worker freed its KV
    assert router.admission.load == Load(0, 0, 0) and not router.active
    with pytest.raises(DeadlineExceeded, match="deadline of 0.5 s passed while it ran"):
        await _drain(router, _input("later"), 60.0)  # longer than the server's: the server's wins
    assert [call[0] for call in decode.abort.calls] == ["late", "later"]
    assert _value(router.metrics, "pdserve_request_deadline_exceeded_total", stage="running") == 2
    assert _value(router.metrics, "pdserve_request_success_total", finished_reason="abort") == 2
    assert _value(router.metrics, "pdserve_request_failures_total") == 0  # a deadline is not a failure


async def test_waiting_for_admission_counts_against_the_deadline(tokenizer: Tokenizer) -> None:
    router, decode = _router(tokenizer, num_blocks=13)  # 208 tokens: one request at a time
    first = asyncio.ensure_future(_drain(router, _input("first")))
    await _until(lambda: decode.generate.started == 1)
    with pytest.raises(DeadlineExceeded, match="deadline of 0.2 s passed while it waited for admission"):
        await _drain(router, _input("second"), 0.2)
    assert decode.generate.started == 1 and "second" not in router.active
    assert router.admission.load == Load(1, 200, 0)
    assert _value(router.metrics, "pdserve_request_deadline_exceeded_total", stage="admission") == 1
    decode.generate.go.set()
    assert (await first)[-1].finish_reason == "length"
    assert isinstance((await _drain(router, _input("again")))[-1], Completion)
    assert router.admission.load == Load(0, 0, 0)


async def test_an_abort_ends_a_request_that_waits_for_admission(tokenizer: Tokenizer) -> None:
    router, decode = _router(tokenizer, num_blocks=13)  # 208 tokens: one request at a time
    first = asyncio.ensure_future(_drain(router, _input("first")))
    await _until(lambda: decode.generate.started == 1)
    waiting = dataclasses.replace(_input("waiting"), owner="alice")
    second = asyncio.ensure_future(_drain(router, waiting))
    await _until(lambda: router.admission.load.queued == 1)
    assert not router.abort("waiting", "mallory")  # not the owner's: as if unknown
    assert router.abort("waiting", "alice")
    events = await asyncio.wait_for(second, 10)
    assert [(type(e), e.finish_reason, e.completion_tokens) for e in events] == [(Completion, "abort", 0)]
    assert decode.generate.started == 1 and router.admission.load == Load(1, 200, 0)
    assert "waiting" not in router.active and "waiting" not in router.tickets
    decode.generate.go.set()
    assert (await first)[-1].finish_reason == "length"
    assert router.admission.load == Load(0, 0, 0)
