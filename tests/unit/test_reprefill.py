"""Re-prefill (services/router/reprefill.py): a prompt whose prefill worker dies before the first token is prefilled
again on another prefill worker, from a fresh reservation, under either failure policy.

The router runs for real over tests/unit/test_router_faults.py's stand-in worker actors; a prefill worker "dies"
by raising the error Ray raises for a dead actor. The served twin, with a real prefill worker process killed
while it prefills, is tests/service/test_reprefill_served.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from services.router.admission import Deadline
from services.router.config import RouterConfig
from services.router.errors import Unavailable
from services.router.messages import Chunk, Completion, GenerateInput
from services.router.metrics import Metrics
from services.router.policies import RoutingRequest, make_policy
from services.router.pool import WorkerHandle
from services.router.reprefill import PrefillDied, Reprefills
from services.router.request_state import RequestState
from services.router.router import Router
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.worker.messages import PrefillResult, TokenBatch
from tests.unit.test_router_faults import Method, StreamMethod, _value, _worker

PROMPT = list(range(10, 60))


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


async def _dies(*_: Any) -> PrefillResult:
    raise ActorDiedError()


async def _unavailable(*_: Any) -> PrefillResult:
    raise ActorUnavailableError("the actor is restarting", b"0" * 16)


async def _refuses(*_: Any) -> PrefillResult:
    raise TransferError("timeout", "the decode side did not answer")


def _prefill(name: str, method: Method | None = None) -> WorkerHandle:
    handle = _worker("prefill", **({"prefill": method} if method else {}))
    handle.name = name
    return handle


def _router(tokenizer: Tokenizer, prefills: list[WorkerHandle], policy: str = "recompute",
            decode: WorkerHandle | None = None) -> Router:
    pools = SimpleNamespace(prefill=prefills, decode=[decode or _worker("decode")],
                            transfer_config=TransferConfig(failure_policy=policy))
    return Router(RouterConfig(local_prefill_threshold=0, prefill_policy="round_robin"), pools,  # type: ignore[arg-type]
                  tokenizer, Metrics(model_name="m"), tokenizer.vocab_size, 512, 16)


async def _drain(router: Router, timeout_s: float | None = None) -> list[Any]:
    inp = GenerateInput(request_id="r", token_ids=PROMPT, params=SamplingParams(max_tokens=3, ignore_eos=True))
    return [event async for event in router.generate(inp, timeout_s)]


@pytest.mark.parametrize("policy", ["recompute", "fail"])
@pytest.mark.parametrize("death", [_dies, _unavailable])
async def test_a_dead_prefill_workers_prompt_is_prefilled_on_another(tokenizer: Tokenizer, policy: str,
                                                                      death: Any) -> None:
    dead, live = _prefill("prefill-a", Method(death)), _prefill("prefill-b")
    streams: list[tuple[Any, ...]] = []

    async def after_first_token(*args: Any) -> AsyncIterator[TokenBatch]:
        streams.append(args)
        yield TokenBatch([8], False, None, 0, decode_start=time.time())
        yield TokenBatch([9], True, "length", 0)

    decode = _worker("decode", generate=StreamMethod(after_first_token))
    router = _router(tokenizer, [dead, live], policy, decode)
    events = await _drain(router)
    assert [t for e in events if isinstance(e, Chunk) for t in e.token_ids] == [7, 8, 9]
    assert isinstance(events[-1], Completion) and events[-1].finish_reason == "length"
    assert len(dead.actor.prefill.calls) == len(live.actor.prefill.calls) == 1
    # The old reservation went back before the new one was made; the decode worker got the new prefill's token.
    assert [c[0] for c in decode.actor.reserve.calls] == ["r", "r"]
    assert [c[0] for c in decode.actor.abort.calls] == ["r"]
    ((rid, prompt, _, first, local, *_),) = streams
    assert (rid, prompt, first, local) == ("r", None, 7, False)
    assert _value(router, "pdserve_request_reprefills_total") == 1
    assert _value(router, "pdserve_kv_transfer_failures_total", reason="peer_gone") == 1
    assert _value(router, "pdserve_request_failures_total") == 0
    assert dead.failures_in_a_row == 1 and live.failures_in_a_row == 0
    assert dead.inflight == live.inflight == decode.inflight == 0


async def test_each_prefill_worker_is_tried_once(tokenizer: Tokenizer) -> None:
    """Both die: the prompt is not sent back to the first; under "fail" the client gets UNAVAILABLE."""
    a, b = _prefill("prefill-a", Method(_dies)), _prefill("prefill-b", Method(_dies))
    router = _router(tokenizer, [a, b], "fail")
    with pytest.raises(Unavailable, match="KV hand-off failed"):
        await _drain(router)
    assert len(a.actor.prefill.calls) == len(b.actor.prefill.calls) == 1
    assert _value(router, "pdserve_request_reprefills_total") == 1


async def test_with_no_other_prefill_worker_the_decode_worker_recomputes(tokenizer: Tokenizer) -> None:
    router = _router(tokenizer, [_prefill("prefill-a", Method(_dies))], "recompute")
    events = await _drain(router)
    assert events[-1].finish_reason == "length"
    assert _value(router, "pdserve_request_reprefills_total") == 0
    assert _value(router, "pdserve_kv_transfer_failures_total", reason="peer_gone") == 1


async def test_a_failed_hand_off_of_a_live_worker_is_not_prefilled_again(tokenizer: Tokenizer) -> None:
    """Only a worker's death moves the prompt: a TransferError is the hand-off's, and the policy applies."""
    refusing, live = _prefill("prefill-a", Method(_refuses)), _prefill("prefill-b")
    router = _router(tokenizer, [refusing, live], "fail")
    with pytest.raises(Unavailable, match="KV hand-off failed"):
        await _drain(router)
    assert not live.actor.prefill.calls
    assert _value(router, "pdserve_request_reprefills_total") == 0


def _state(tokenizer: Tokenizer, deadline: Deadline, output_ids: list[int] | None = None) -> RequestState:
    params = SamplingParams(max_tokens=3)
    st = RequestState("r", 0, PROMPT, params, IncrementalDetokenizer(tokenizer, (), 0), deadline=deadline)
    st.output_ids = output_ids or []
    return st


@pytest.mark.parametrize("case", ["deadline passed", "a token was sent"])
def test_no_re_prefill_past_the_deadline_or_after_a_token(tokenizer: Tokenizer, case: str) -> None:
    dead, live = _prefill("prefill-a"), _prefill("prefill-b")
    deadline = Deadline(1.0, time.monotonic() - 0.1) if case == "deadline passed" else Deadline.within(60)
    st = _state(tokenizer, deadline, [7] if case == "a token was sent" else None)
    reprefills = Reprefills(Metrics(model_name="m"), make_policy("round_robin"))
    routing = RoutingRequest(PROMPT, 16)
    assert reprefills.target(st, PrefillDied(dead, ActorDiedError()), [dead, live], routing) is None
    fresh = _state(tokenizer, Deadline.within(60))
    assert reprefills.target(fresh, PrefillDied(dead, ActorDiedError()), [dead, live], routing) is live
