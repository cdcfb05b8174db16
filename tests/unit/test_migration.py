"""Migration by token replay (services/router/migration.py) and the per-worker circuit breaker (WorkerHandle).

The router runs for real over stand-in worker actors (tests/unit/test_router_faults.py's, which answer `.remote()`
the way Ray actor handles do, and serve their token streams over a real TokenServer); a worker "dies" by raising
the error Ray raises for a dead actor from a call, or by its token stream ending before the finished batch. The
breaker is tested on real WorkerHandles, and through WorkerPools' own health poll. The served twin, with a real
worker process killed mid-stream, is tests/service/test_migration_served.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorUnavailableError

from services.engine.errors import InvalidRequest
from services.engine.sampling_params import SamplingParams
from services.engine.stats import WorkerStats
from services.engine.tokenizer import Tokenizer
from services.router.config import RouterConfig
from services.router.errors import Unavailable
from services.router.messages import Chunk, Completion, GenerateInput
from services.router.metrics import Metrics
from services.router.pool import PoolSpec, WorkerHandle, WorkerPools
from services.router.router import Router
from services.transfer.config import TransferConfig
from services.worker.messages import LoadInfo, PrefillResult, TokenBatch, WorkerInfo
from tests.unit.test_router_faults import Method, StreamMethod, _value, _worker

PROMPT = list(range(10, 60))


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


def _decode(name: str, generate: StreamMethod) -> WorkerHandle:
    handle = _worker("decode", generate=generate)
    handle.name = name
    handle.info = WorkerInfo(name, "decode", "127.0.0.1:1", 16, 100)
    return handle


def _router(tokenizer: Tokenizer, decode: list[WorkerHandle], **config: Any) -> Router:
    pools = SimpleNamespace(prefill=[_worker("prefill")], decode=decode, transfer_config=TransferConfig())
    return Router(RouterConfig(local_prefill_threshold=0, **config), pools,  # type: ignore[arg-type]
                  tokenizer, Metrics(model_name="m"), tokenizer.vocab_size, 512, 16)


def _input(max_tokens: int = 6, request_id: str = "", **params: Any) -> GenerateInput:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)
    return GenerateInput(request_id=request_id, token_ids=PROMPT, params=sampling)


async def _drain(router: Router, inp: GenerateInput) -> list[Any]:
    return [event async for event in router.generate(inp)]


def _tokens(events: list[Any]) -> list[int]:
    return [t for e in events if isinstance(e, Chunk) for t in e.token_ids]


def _dies_after(*batches: list[int], error: BaseException | None = None) -> StreamMethod:
    """A decode worker that streams `batches` (after the prefill side's first token 7) and then dies: its token
    stream ends there (or it raises `error`, which reaches the router as the worker's own error)."""

    async def stream(*_: Any) -> AsyncIterator[TokenBatch]:
        for i, tokens in enumerate(batches):
            yield TokenBatch(tokens, False, None, 0, decode_start=time.time() if i == 0 else None)
        raise error or ConnectionResetError("the worker died")  # the server drops the connection on it

    return StreamMethod(stream)


def _continues(calls: list[tuple[Any, ...]], max_tokens: int = 6) -> StreamMethod:
    """A decode worker that continues the count 7, 8, 9, ... after the tokens it is given as generated (or the
    prefill side's first token), as a model would continue a replayed prompt; it records each call's arguments."""

    async def stream(*args: Any) -> AsyncIterator[TokenBatch]:
        calls.append(args)
        first_token, generated = args[3], args[6]
        generated = generated if generated is not None else [first_token]  # remote: after the prefill's token
        nxt = 7 + len(generated)
        left = max_tokens - len(generated)
        for i in range(left):
            yield TokenBatch([nxt + i], i == left - 1, "length" if i == left - 1 else None, 0,
                             decode_start=time.time() if i == 0 else None)

    return StreamMethod(stream)


# ---- migration ---------------------------------------------------------------------------------------------


async def test_a_dead_decode_workers_stream_continues_on_another(tokenizer: Tokenizer) -> None:
    calls: list[tuple[Any, ...]] = []
    a, b = _decode("decode-a", _dies_after([8], [9])), _decode("decode-b", _continues(calls))
    router = _router(tokenizer, [a, b])
    events = await _drain(router, _input(request_id="r"))
    assert _tokens(events) == [7, 8, 9, 10, 11, 12]  # no token twice, none missing
    assert isinstance(events[-1], Completion) and events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 6
    (rid, prompt, params, first, local, _, generated), = calls
    assert (rid, prompt, first, local, generated) == ("r", PROMPT, None, True, [7, 8, 9])
    assert params.max_tokens == 6  # the replayed tokens count as generated: max_tokens is not cut twice
    assert _value(router, "pdserve_request_migrations_total") == 1
    assert _value(router, "pdserve_request_success_total", finished_reason="length") == 1
    assert a.inflight == 0 and b.inflight == 0
    assert a.failures_in_a_row == 1 and b.failures_in_a_row == 0 and a.routable


async def test_the_detokenizer_and_stop_strings_carry_over(tokenizer: Tokenizer) -> None:
    """The text is that of the whole token stream, and a stop string that spans the move still stops it."""
    words = tokenizer.encode(" one two three four five six seven eight")
    full, stop = tokenizer.decode(words), tokenizer.decode(words[3:5])  # words[3] on the dead worker, [4] after

    async def first(rid: str, *_: Any) -> PrefillResult:
        return PrefillResult(rid, first_token=words[0], finish_reason=None, cached_tokens=0, transfer_wait_s=0.0,
                             bytes_sent=64)

    async def after(*args: Any) -> AsyncIterator[TokenBatch]:
        rest = words[len(args[6]):]
        for i, token in enumerate(rest):
            yield TokenBatch([token], i == len(rest) - 1, "length", 0, decode_start=time.time() if i == 0 else None)

    a, b = _decode("decode-a", _dies_after(words[1:4])), _decode("decode-b", StreamMethod(after))
    router = _router(tokenizer, [a, b])
    router.pools.prefill = [_worker("prefill", prefill=Method(first))]
    events = await _drain(router, _input(max_tokens=len(words), stop=(stop,)))
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == full[:full.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert _value(router, "pdserve_request_migrations_total") == 1


async def test_a_worker_that_dies_while_reserving_moves_before_any_token(tokenizer: Tokenizer) -> None:
    async def dead(*_: Any) -> Any:
        raise ActorUnavailableError("the actor is restarting", None)

    calls: list[tuple[Any, ...]] = []
    a, b = _decode("decode-a", _continues([])), _decode("decode-b", _continues(calls))
    a.actor.reserve = Method(dead)
    events = await _drain(_router(tokenizer, [a, b]), _input())
    assert _tokens(events) == [7, 8, 9, 10, 11, 12]
    assert calls[0][6] == [] and calls[0][4] is True  # prefilled on b, nothing replayed


async def test_past_the_limit_the_client_gets_the_error(tokenizer: Tokenizer) -> None:
    for limit, workers in ((0, 2), (1, 3)):
        decode = [_decode(f"decode-{i}", _dies_after([8])) for i in range(workers)]
        router = _router(tokenizer, decode, migration_limit=limit)
        with pytest.raises(Unavailable, match="a worker failed: TokenStreamLost"):
            await _drain(router, _input())
        assert _value(router, "pdserve_request_migrations_total") == limit
        assert _value(router, "pdserve_request_failures_total", reason="worker_failed") == 1
        assert sum(w.actor.generate.sent > 0 for w in decode) == limit + 1
        assert all(w.inflight == 0 for w in decode)


async def test_with_no_other_decode_worker_the_client_gets_the_error(tokenizer: Tokenizer) -> None:
    router = _router(tokenizer, [_decode("decode-a", _dies_after([8]))])
    with pytest.raises(Unavailable, match="a worker failed"):
        await _drain(router, _input())
    assert _value(router, "pdserve_request_migrations_total") == 0


async def test_only_a_dead_worker_moves_a_request(tokenizer: Tokenizer) -> None:
    """A refusal or an engine failure is not a death: it reaches the client as before."""
    for error, raised in ((InvalidRequest("bad"), InvalidRequest), (RuntimeError("bug"), Unavailable)):
        calls: list[tuple[Any, ...]] = []
        router = _router(tokenizer, [_decode("decode-a", _dies_after([8], error=error)),
                                     _decode("decode-b", _continues(calls))])
        with pytest.raises(raised):
            await _drain(router, _input())
        assert not calls
        assert _value(router, "pdserve_request_migrations_total") == 0


async def test_seeded_sampling_replays_its_position(tokenizer: Tokenizer) -> None:
    """The new worker gets the request's own seed and the tokens so far as generated: each draw is seeded by
    (seed, tokens so far), so it draws what the dead worker would have (the engine side of that is
    tests/engine/test_resume_replay.py; end to end, the served test)."""
    calls: list[tuple[Any, ...]] = []
    router = _router(tokenizer, [_decode("decode-a", _dies_after([8])), _decode("decode-b", _continues(calls))])
    await _drain(router, _input(temperature=0.8, seed=1234))
    assert calls[0][2].seed == 1234 and calls[0][6] == [7, 8]


# ---- the circuit breaker --------------------------------------------------------------------------------------


def test_the_breaker_opens_after_failures_in_a_row_and_closes_when_health_answers() -> None:
    w = WorkerHandle("decode-0", "decode", actor=None, alive=True)
    w.record_failure(3)
    w.record_failure(3)
    w.record_success()  # not in a row
    w.record_failure(3)
    w.record_failure(3)
    assert w.routable and w.failures_in_a_row == 2
    w.record_failure(3)
    assert not w.routable and w.tripped_at is not None
    w.record_success()  # a request it already had finishing does not close it
    assert not w.routable
    w.health_answered()
    assert w.routable and w.failures_in_a_row == 0


def test_a_zero_threshold_never_opens_the_breaker() -> None:
    w = WorkerHandle("prefill-0", "prefill", actor=None, alive=True)
    for _ in range(100):
        w.record_failure(0)
    assert w.routable


async def test_an_open_breaker_sends_new_requests_elsewhere(tokenizer: Tokenizer) -> None:
    calls: list[tuple[Any, ...]] = []
    a, b = _decode("decode-a", _dies_after([8])), _decode("decode-b", _continues(calls))
    router = _router(tokenizer, [a, b], circuit_breaker_failures=3)
    for _ in range(3):  # each starts on a (least loaded, first), which dies; each moves to b
        assert _tokens(await _drain(router, _input())) == [7, 8, 9, 10, 11, 12]
    assert a.actor.generate.sent == 3 and not a.routable
    assert _tokens(await _drain(router, _input())) == [7, 8, 9, 10, 11, 12]
    assert a.actor.generate.sent == 3  # skipped
    assert len(calls) == 4 and calls[-1][6] is None  # b ran the last one from the start, as a remote request


async def test_the_pools_health_poll_closes_the_breaker() -> None:
    """WorkerPools' own poll: a worker that answers its health poll takes new requests again; one that does not
    stays skipped."""
    up = True

    async def load(*_: Any) -> LoadInfo:
        if not up:
            raise ActorUnavailableError("restarting", None)
        return LoadInfo(WorkerStats(worker="decode-a", role="decode"), 0, 0, None, pid=1)

    async def ready(*_: Any) -> WorkerInfo:
        return WorkerInfo("decode-a", "decode", "127.0.0.1:1", 16, 100)

    pools = WorkerPools(None, TransferConfig(), PoolSpec(0, 1, colocated=False),  # type: ignore[arg-type]
                        Metrics(model_name="m"))
    w = WorkerHandle("decode-a", "decode", SimpleNamespace(load=Method(load), ready=Method(ready)), alive=True)
    for _ in range(3):
        w.record_failure(3)
    up = False
    await pools._poll(w)
    assert not w.routable and not w.alive
    up = True
    await pools._poll(w)
    assert w.routable and w.alive
