"""The Router's fault handling (issue 17), over stand-in worker actors: who may abort, request ids, stop strings,
cancellation before the first token, and what the metrics count when things fail.

The stand-ins answer `.remote()` the way Ray actor handles do (something to await, or for a streaming call an
async iterator of things to await) and record every call, so a test can script a worker's answers and check
what the router asked of it. The served twins of these tests are in tests/service/test_bad_input_served.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.engine.errors import InvalidRequest
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.router.config import RouterConfig
from services.router.errors import Unavailable
from services.router.messages import Chunk, Completion, GenerateInput
from services.router.metrics import Metrics
from services.router.pool import WorkerHandle
from services.router.router import MAX_STOP_STRINGS, Router
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.worker.messages import PrefillResult, Reservation, TokenBatch, WorkerInfo
from tests.token_worker import serving_ready

MODEL = "m"


class Method:
    """One actor method: `.remote(*args)` runs `behaviour(*args)` as a task and records the call."""

    def __init__(self, behaviour: Callable[..., Awaitable[Any]]) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        self.calls.append(args)
        return asyncio.ensure_future(self.behaviour(*args))


class StreamMethod:
    """A decode worker's generate, which the stand-in actor serves over a real TokenServer (tests/token_worker.py).
    `sent` counts the batches handed out."""

    def __init__(self, batches: Callable[..., AsyncIterator[TokenBatch]]) -> None:
        self.batches = batches
        self.sent = 0

    async def __call__(self, *args: Any) -> AsyncIterator[TokenBatch]:
        async for batch in self.batches(*args):
            self.sent += 1
            yield batch


async def _nothing(*_: Any) -> bool:
    return True


async def _reserve(rid: str, *_: Any) -> Reservation:
    return Reservation(rid, 0, 30.0)


async def _first_token(rid: str, *_: Any) -> PrefillResult:
    return PrefillResult(rid, first_token=7, finish_reason=None, cached_tokens=0, transfer_wait_s=0.0, bytes_sent=64)


async def _two_tokens(*_: Any) -> AsyncIterator[TokenBatch]:
    yield TokenBatch([8], False, None, 0, decode_start=time.time())
    yield TokenBatch([9], True, "length", 0)


def _worker(role: str, **methods: Any) -> WorkerHandle:
    actor = SimpleNamespace(abort=Method(_nothing), reserve=Method(_reserve), prefill=Method(_first_token),
                            generate=StreamMethod(_two_tokens))
    for name, method in methods.items():
        setattr(actor, name, method)
    info = WorkerInfo(f"{role}-0", role, "127.0.0.1:1" if role == "decode" else None, 16, 100)
    actor.ready = Method(serving_ready(actor, info))
    return WorkerHandle(f"{role}-0", role, actor, info=info, alive=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


def _router(tokenizer: Tokenizer, prefill: WorkerHandle | None = None, decode: WorkerHandle | None = None,
            policy: str = "recompute") -> Router:
    pools = SimpleNamespace(prefill=[prefill or _worker("prefill")], decode=[decode or _worker("decode")],
                            transfer_config=TransferConfig(failure_policy=policy))
    config = RouterConfig(local_prefill_threshold=0)
    return Router(config, pools, tokenizer, Metrics(model_name=MODEL), tokenizer.vocab_size, 512, 16)  # type: ignore[arg-type]


def _input(request_id: str = "", n: int = 1, max_tokens: int = 2, owner: str | None = None,
           stop: tuple[str, ...] = ()) -> GenerateInput:
    params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, stop=stop)
    return GenerateInput(request_id=request_id, token_ids=list(range(10, 60)), params=params, owner=owner)


def _value(router: Router, name: str, **labels: str) -> float:
    text = router.metrics.render().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def _drain(router: Router, inp: GenerateInput) -> list[Any]:
    return [event async for event in router.generate(inp)]


async def _blocked(*_: Any) -> Any:
    await asyncio.Event().wait()


async def _stalled(*_: Any) -> AsyncIterator[TokenBatch]:
    """A decode stream that sends a token and then nothing until it is cancelled."""
    yield TokenBatch([8], False, None, 0, decode_start=time.time())
    await asyncio.Event().wait()


async def _wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


# ---- Abort and request ids --------------------------------------------------------------------------------


async def test_abort_needs_the_owner(tokenizer: Tokenizer) -> None:
    decode = _worker("decode", generate=StreamMethod(_stalled))
    router = _router(tokenizer, decode=decode)
    running = asyncio.ensure_future(_drain(router, _input("r", max_tokens=10, owner="peer:a")))
    await _wait_for(lambda: decode.actor.generate.sent == 1)
    assert not router.abort("r", "peer:b")
    assert not router.abort("r", None)
    assert not running.done()
    assert router.abort("r", "peer:a")
    events = await running
    assert isinstance(events[-1], Completion) and events[-1].finish_reason == "abort"
    assert not router.abort("r", "peer:a")  # over


async def test_the_outputs_of_n_hold_their_worker_ids(tokenizer: Tokenizer) -> None:
    decode = _worker("decode", generate=StreamMethod(_stalled))
    router = _router(tokenizer, decode=decode)
    family = asyncio.ensure_future(_drain(router, _input("fam", n=2, max_tokens=10)))
    await _wait_for(lambda: decode.actor.generate.sent == 2)  # both outputs run
    for taken in ("fam-0", "fam-1", "fam"):
        with pytest.raises(InvalidRequest, match="already in use"):
            await asyncio.wait_for(_drain(router, _input(taken)), 10)
    family.cancel()
    await asyncio.gather(family, return_exceptions=True)
    assert not router.worker_ids and not router.active


async def test_an_id_stays_taken_until_its_release_is_over(tokenizer: Tokenizer) -> None:
    """The release aborts by id on the workers: a new request with the id must not start before it is over."""
    gate = asyncio.Event()

    async def slow_abort(*_: Any) -> bool:
        await gate.wait()
        return True

    decode = _worker("decode", generate=StreamMethod(_stalled), abort=Method(slow_abort))
    router = _router(tokenizer, decode=decode)
    first = asyncio.ensure_future(_drain(router, _input("again", max_tokens=10, owner="o")))
    await _wait_for(lambda: decode.actor.generate.sent == 1)
    assert router.abort("again", "o")
    await _wait_for(lambda: bool(decode.actor.abort.calls))
    with pytest.raises(InvalidRequest, match="already in use"):
        await _drain(router, _input("again"))
    gate.set()
    await first
    decode.actor.generate = StreamMethod(_two_tokens)
    assert isinstance((await _drain(router, _input("again")))[-1], Completion)


async def test_too_many_stop_strings_are_refused(tokenizer: Tokenizer) -> None:
    router = _router(tokenizer)
    stops = tuple(f"s{i}" for i in range(1000))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_STOP_STRINGS}") as err:
        await _drain(router, _input(stop=stops))
    assert getattr(err.value, "param", None) == "stop"
    assert isinstance((await _drain(router, _input(stop=stops[:MAX_STOP_STRINGS])))[-1], Completion)


# ---- cancellation ---------------------------------------------------------------------------------------------


async def test_cancel_before_the_first_token_aborts_the_prefill(tokenizer: Tokenizer) -> None:
    prefill = _worker("prefill", prefill=Method(_blocked))
    decode = _worker("decode")
    router = _router(tokenizer, prefill=prefill, decode=decode)
    running = asyncio.ensure_future(_drain(router, _input("long", owner="o")))
    await _wait_for(lambda: bool(prefill.actor.prefill.calls))
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert [call[0] for call in prefill.actor.abort.calls] == ["long"]
    assert [call[0] for call in decode.actor.abort.calls] == ["long"]  # its reservation
    assert prefill.inflight == 0 and decode.inflight == 0
    assert _value(router, "pdserve_request_success_total", finished_reason="abort") == 1


# ---- metrics -------------------------------------------------------------------------------------------------


async def test_a_failed_hand_off_counts_once(tokenizer: Tokenizer) -> None:
    """The prefill side raises, then the decode worker, which recomputed the prompt, reports the same failure."""

    async def failing_prefill(*_: Any) -> PrefillResult:
        raise TransferError("timeout", "no acknowledgement")

    async def recomputed(*_: Any) -> AsyncIterator[TokenBatch]:
        yield TokenBatch([8], False, None, 0, decode_start=time.time(), kv_failure="timeout")
        yield TokenBatch([9], True, "length", 0)

    router = _router(tokenizer, prefill=_worker("prefill", prefill=Method(failing_prefill)),
                     decode=_worker("decode", generate=StreamMethod(recomputed)))
    for i in range(3):
        events = await _drain(router, _input(f"h{i}"))
        assert [e.token_ids for e in events if isinstance(e, Chunk) and e.token_ids] == [[8], [9]]
    assert _value(router, "pdserve_kv_transfer_failures_total", reason="timeout") == 3
    assert _value(router, "pdserve_kv_transfer_failures_total") == 3


async def test_failures_are_counted_by_reason_and_as_error_finishes(tokenizer: Tokenizer) -> None:
    async def failing_prefill(*_: Any) -> PrefillResult:
        raise TransferError("peer_gone", "the decode side hung up")

    async def worker_error(*_: Any) -> AsyncIterator[TokenBatch]:
        yield TokenBatch([], True, "error", 0)

    router = _router(tokenizer, prefill=_worker("prefill", prefill=Method(failing_prefill)), policy="fail")
    with pytest.raises(Unavailable, match="KV hand-off failed"):
        await _drain(router, _input())
    router.pools.prefill = [_worker("prefill")]
    router.pools.decode = [_worker("decode", generate=StreamMethod(worker_error))]
    with pytest.raises(Unavailable, match="decode worker failed"):
        await _drain(router, _input())
    with pytest.raises(InvalidRequest):
        await _drain(router, GenerateInput(token_ids=[5, 10**6]))
    for reason, count in {"transfer_failed": 1, "worker_failed": 1, "invalid_request": 1, "unavailable": 0}.items():
        assert _value(router, "pdserve_request_failures_total", reason=reason) == count, reason
    assert _value(router, "pdserve_request_success_total", finished_reason="error") == 2  # the refused one never ran
    assert _value(router, "pdserve_requests_finished_total") == 2
    assert _value(router, "pdserve_kv_transfer_failures_total", reason="peer_gone") == 1


async def test_generation_tokens_count_as_they_stream(tokenizer: Tokenizer) -> None:
    more = asyncio.Event()

    async def paused(*_: Any) -> AsyncIterator[TokenBatch]:
        yield TokenBatch([8, 9], False, None, 0, decode_start=time.time())
        await more.wait()
        yield TokenBatch([10], True, "length", 0)

    router = _router(tokenizer, decode=_worker("decode", generate=StreamMethod(paused)))
    events = router.generate(_input(max_tokens=4))
    received = 0
    while received < 3:  # the prefill side's first token, then the decode worker's two
        event = await anext(events)
        received += len(event.token_ids) if isinstance(event, Chunk) else 0
    assert _value(router, "pdserve_generation_tokens_total") == 3  # before the request ends
    more.set()
    async for _ in events:
        pass
    assert _value(router, "pdserve_generation_tokens_total") == 4
