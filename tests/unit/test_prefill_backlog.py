"""Prefill on the decode worker when the prefill pool is backlogged (RouterConfig.local_prefill_backlog_tokens):
the router counts the prompt tokens it has sent each prefill worker and not yet seen prefilled, and the prompts it
left to each decode worker, over tests/unit/test_router_faults.py's stand-in worker actors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.router.config import RouterConfig
from services.router.messages import Completion, GenerateInput
from services.router.metrics import Metrics
from services.router.pool import WorkerHandle
from services.router.router import Router
from services.transfer.config import TransferConfig
from services.worker.messages import PrefillResult, TokenBatch
from tests.unit.test_router_faults import Method, StreamMethod, _value, _wait_for, _worker

PROMPT = list(range(10, 60))  # 50 tokens, none cached


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


class Gate:
    """Holds every call until opened."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def prefill(self, rid: str, *_: Any) -> PrefillResult:
        await self.open.wait()
        return PrefillResult(rid, first_token=7, finish_reason=None, cached_tokens=0, transfer_wait_s=0.0,
                             bytes_sent=64)

    async def stream(self, *args: Any) -> AsyncIterator[TokenBatch]:
        await self.open.wait()
        yield TokenBatch([8], False, None, 0, decode_start=time.time())
        yield TokenBatch([9], True, "length", 0)


def _router(tokenizer: Tokenizer, prefill: WorkerHandle, decode: WorkerHandle, backlog_tokens: int) -> Router:
    pools = SimpleNamespace(prefill=[prefill], decode=[decode], transfer_config=TransferConfig())
    config = RouterConfig(local_prefill_threshold=0, local_prefill_backlog_tokens=backlog_tokens)
    return Router(config, pools, tokenizer, Metrics(model_name="m"), tokenizer.vocab_size, 512, 16)  # type: ignore[arg-type]


async def _request(router: Router, rid: str) -> list[Any]:
    inp = GenerateInput(request_id=rid, token_ids=PROMPT, params=SamplingParams(max_tokens=3, ignore_eos=True))
    return [event async for event in router.generate(inp)]


async def test_a_backlogged_prefill_worker_leaves_the_next_prompt_to_the_decode_worker(tokenizer: Tokenizer) -> None:
    prefilling, decoding = Gate(), Gate()
    prefill = _worker("prefill", prefill=Method(prefilling.prefill))
    calls: list[tuple[Any, ...]] = []

    async def recorded(*args: Any) -> AsyncIterator[TokenBatch]:
        calls.append(args)
        async for batch in decoding.stream(*args):
            yield batch

    decode = _worker("decode", generate=StreamMethod(recorded))
    router = _router(tokenizer, prefill, decode, backlog_tokens=40)
    first = asyncio.ensure_future(_request(router, "a"))  # prefills remotely and waits there: a backlog of 50
    await _wait_for(lambda: prefill.prefill_backlog == 50)
    second = asyncio.ensure_future(_request(router, "b"))  # the decode worker has none: it prefills "b"
    await _wait_for(lambda: decode.prefill_backlog == 50)
    third = asyncio.ensure_future(_request(router, "c"))  # both hold 50: "c" waits for the prefill worker
    await _wait_for(lambda: prefill.prefill_backlog == 100)
    prefilling.open.set()
    decoding.open.set()
    for done in await asyncio.gather(first, second, third):
        assert isinstance(done[-1], Completion) and done[-1].finish_reason == "length"
    assert {args[0]: args[4] for args in calls} == {"a": False, "b": True, "c": False}
    assert [c[0] for c in prefill.actor.prefill.calls] == ["a", "c"]
    assert prefill.prefill_backlog == decode.prefill_backlog == 0
    assert _value(router, "pdserve_disagg_decisions_total", decision="local_prefill_backlog") == 1
    assert _value(router, "pdserve_disagg_decisions_total", decision="remote_prefill") == 2


async def test_without_the_limit_every_prompt_goes_to_the_prefill_pool(tokenizer: Tokenizer) -> None:
    prefilling = Gate()
    prefill = _worker("prefill", prefill=Method(prefilling.prefill))
    decode = _worker("decode")
    router = _router(tokenizer, prefill, decode, backlog_tokens=0)
    first = asyncio.ensure_future(_request(router, "a"))
    await _wait_for(lambda: prefill.prefill_backlog == 50)
    second = asyncio.ensure_future(_request(router, "b"))
    await _wait_for(lambda: prefill.prefill_backlog == 100)
    prefilling.open.set()
    await asyncio.gather(first, second)
    assert [c[0] for c in prefill.actor.prefill.calls] == ["a", "b"]
    assert _value(router, "pdserve_disagg_decisions_total", decision="local_prefill_backlog") == 0


async def test_a_local_prompt_that_fails_leaves_no_backlog_behind(tokenizer: Tokenizer) -> None:
    """The decode worker fails the request before its first batch: its backlog still goes back to 0."""
    prefilling = Gate()
    prefill = _worker("prefill", prefill=Method(prefilling.prefill))

    async def fails(*_: Any) -> AsyncIterator[TokenBatch]:
        raise RuntimeError("the engine failed")
        yield  # an async generator

    decode = _worker("decode", generate=StreamMethod(fails))
    router = _router(tokenizer, prefill, decode, backlog_tokens=40)
    first = asyncio.ensure_future(_request(router, "a"))
    await _wait_for(lambda: prefill.prefill_backlog == 50)
    with pytest.raises(Exception):  # noqa: B017 - whichever error reaches the client
        await _request(router, "b")
    assert decode.prefill_backlog == 0
    assert decode.actor.reserve.calls and _value(
        router, "pdserve_disagg_decisions_total", decision="local_prefill_backlog") == 1
    prefilling.open.set()
    await asyncio.gather(first, return_exceptions=True)
    assert prefill.prefill_backlog == 0


def test_the_limit_is_not_negative() -> None:
    with pytest.raises(ValueError, match="local_prefill_backlog_tokens"):
        RouterConfig(local_prefill_backlog_tokens=-1)
