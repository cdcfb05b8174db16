"""Faults and bad input against a real `pdserve serve` (issue 17): every bad request gets a clear 4xx or
INVALID_ARGUMENT (never a 500 or UNKNOWN), the server keeps serving, Abort checks who owns the request, a
request cancelled before its first token stops its prefill, and the metrics count failures once."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from tests.service.conftest import RunningServer

GENERATE = "/pdserve.v1.Generation/Generate"
ABORT = "/pdserve.v1.Generation/Abort"


@pytest.fixture(scope="module")
def server(disagg_server: RunningServer) -> RunningServer:
    return disagg_server.wait_http_ready()


def _greedy(ids: list[int], max_tokens: int, request_id: str = "", n: int | None = None) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if n is not None:
        sampling.n = n
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=ids), sampling=sampling)


def _assert_serving(server: RunningServer) -> None:
    assert httpx.get(f"{server.http_base}/health", timeout=10).status_code == 200
    replies = list(server.stub().Generate(_greedy([1, 2, 3], 2), timeout=60))
    assert replies[-1].complete.usage.completion_tokens == 2


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    return error  # type: ignore[no-any-return]


def _rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _metric(server: RunningServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.http_base}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- HTTP bodies ---------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_400(server: RunningServer) -> None:
    url = f"{server.http_base}/v1/completions"
    deep = b'{"prompt": "hi", "max_tokens": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = _error(httpx.post(url, content=deep, timeout=60), 400)
    assert error["code"] == "invalid_json" and "nested" in error["message"]
    bounded = b'{"prompt": "hi", "max_tokens": 1, "x": ' + b"[" * 200 + b"]" * 200 + b"}"
    assert "nested" in _error(httpx.post(url, content=bounded, timeout=60), 400)["message"]
    shallow = b'{"prompt": "hi", "max_tokens": 1, "x": ' + b"[" * 8 + b"]" * 8 + b"}"
    assert httpx.post(url, content=shallow, timeout=60).status_code == 200
    _assert_serving(server)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 1}'),  # bytes that are not UTF-8
    ("/v1/completions", b'{"prompt": "\\ud800 hi", "max_tokens": 1}'),  # a lone surrogate
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1, "stop": ["\\udfff"]}'),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi", "max_tokens": 1}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 1}'),
    ("/tokenize", b'{"prompt": "\\ud83d"}'),
], ids=["bytes", "prompt", "stop", "model", "chat", "tokenize"])
def test_invalid_unicode_in_json_is_400(server: RunningServer, path: str, body: bytes) -> None:
    error = _error(httpx.post(server.http_base + path, content=body, timeout=60), 400)
    assert "UTF-8" in error["message"] or "surrogate" in error["message"]
    _assert_serving(server)


def test_ten_megabyte_bodies_are_refused(server: RunningServer) -> None:
    big = "a" * 10_000_000
    _error(httpx.post(f"{server.http_base}/v1/completions", json={"prompt": big}, timeout=60), 413)
    err = _rpc_error(lambda: list(server.stub().Generate(pb.GenerateRequest(text=big), timeout=60)))
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "limit" in err.details()
    _assert_serving(server)


def test_a_thousand_stop_strings_are_refused(server: RunningServer) -> None:
    stops = [f"stop-{i}" for i in range(1000)]
    body = {"prompt": "hi", "max_tokens": 2, "stop": stops}
    error = _error(httpx.post(f"{server.http_base}/v1/completions", json=body, timeout=60), 400)
    assert error["param"] == "stop" and "stop" in error["message"]
    request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2, stop=stops))
    err = _rpc_error(lambda: list(server.stub().Generate(request, timeout=60)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop" in err.details()
    within = {"prompt": "hi", "max_tokens": 2, "stop": stops[:16]}
    assert httpx.post(f"{server.http_base}/v1/completions", json=within, timeout=60).status_code == 200
    _assert_serving(server)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([-(2**70), -1, 0, 1, 2, 3, 2**31, 2**63, 10**30])
    if kind == "float":
        return rng.choice([-1.5, 0.0, 0.5, 1.0, 2.5, 1e308, -0.0])
    if kind == "str":
        return rng.choice(["", "hi", "stop", "\u00e9\u4e2d\U0001f600", "x" * 300, "\x00", "user", "text", "none"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return {rng.choice(["role", "content", "type", "text", "k"]): _random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return None


# Plausible values per field; the fuzz mixes them with random ones of any type.
GOOD: dict[str, list[Any]] = {
    "temperature": [0.0, 0.7, 1.0], "top_p": [0.5, 1.0], "n": [1, 2], "stream": [False, True], "seed": [0, 7],
    "stop": ["x", ["a", "b"], []], "user": ["u"], "presence_penalty": [0.0, 1.0], "frequency_penalty": [0.5],
    "logit_bias": [{"5": 1.0}], "top_k": [-1, 5], "min_p": [0.1], "repetition_penalty": [1.1], "min_tokens": [0, 1],
    "ignore_eos": [True, False], "stop_token_ids": [[2]], "priority": [0, 1], "unknown_field": [1, "x"],
    "stream_options": [{"include_usage": True}], "prompt_logprobs": [0, 1], "best_of": [1],
    "prompt": ["hello", [1, 2, 3], [[5, 6]], ["once"]], "echo": [False, True], "logprobs": [None, 1],
    "messages": [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}]],
    "top_logprobs": [0, 2], "tool_choice": ["none", "auto"],
}
SMALL_TOKENS = [1, 2, 3, 0, -1, "3", 2.0, True]  # not null: that means the rest of the context


def _fuzz_body(rng: random.Random, chat: bool) -> dict[str, Any]:
    """A body of a few fields, each plausible or (one time in four) random. Token counts stay tiny (or are
    invalid), so no request runs long: the point is the status code."""
    required = "messages" if chat else "prompt"
    skip = {"prompt", "echo"} if chat else {"messages", "top_logprobs", "tool_choice"}
    names = [name for name in GOOD if name not in skip]
    body: dict[str, Any] = {}
    for name in rng.sample(names, k=rng.randint(0, 5)) + ([required] if rng.random() < 0.9 else []):
        body[name] = _random_value(rng) if rng.random() < 0.25 else rng.choice(GOOD[name])
    if chat and body.get("logprobs") == 1:
        body["logprobs"] = True
    body["max_tokens"] = rng.choice(SMALL_TOKENS) if rng.random() < 0.3 else rng.choice([1, 2])
    if chat and rng.random() < 0.2:
        body["max_completion_tokens"] = rng.choice(SMALL_TOKENS)
    return body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_schema_fuzz_never_gets_a_5xx(server: RunningServer, path: str) -> None:
    """A small seeded fuzz of the request schema (hypothesis is not installed here): 50 bodies per endpoint."""
    rng = random.Random(17)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.http_base, timeout=60) as client:
        for _ in range(50):
            body = _fuzz_body(rng, chat=path.endswith("chat/completions"))
            r = client.post(path, content=json.dumps(body).encode())
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                assert r.json()["error"]["message"], (body, r.text)
    assert statuses.get(400, 0) > 0 and statuses.get(200, 0) > 0, statuses
    _assert_serving(server)


# ---- gRPC messages and ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "data", "needle"), [
    (GENERATE, b"\xff\xff\xff\xff\x0f", "parse"),  # not protobuf at all
    (GENERATE, b"\x12\x02\xff\xfe", "UTF-8"),  # text = bytes 0xff 0xfe
    (GENERATE, b"\x0a\x02\xff\xfe\x12\x02hi", "UTF-8"),  # request_id = bytes 0xff 0xfe
    (ABORT, b"\xff\xff", "parse"),
    (ABORT, b"\x0a\x01\xff", "UTF-8"),
], ids=["generate-garbage", "generate-text", "generate-id", "abort-garbage", "abort-id"])
def test_undecodable_messages_are_invalid_argument(server: RunningServer, method: str, data: bytes,
                                                  needle: str) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        if method == GENERATE:
            call = channel.unary_stream(method)
            err = _rpc_error(lambda: list(call(data, timeout=30)))
        else:
            unary = channel.unary_unary(method)
            err = _rpc_error(lambda: unary(data, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert needle in err.details()
    _assert_serving(server)


async def _generate(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> int | grpc.StatusCode:
    """How many tokens the call streamed before its complete reply, or its error code. (Replies are not
    counted: a reply carries every token that was ready, one or several.)"""
    try:
        replies = [r async for r in stub.Generate(request, timeout=60)]
        assert replies[-1].HasField("complete"), replies[-1]
        return sum(len(r.chunk.token_ids) for r in replies if r.HasField("chunk"))
    except grpc.aio.AioRpcError as e:
        return e.code()


def test_duplicate_request_ids(server: RunningServer) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            same = _greedy(list(range(10, 100)), 20, request_id="dup")
            results = await asyncio.gather(*(_generate(stub, same) for _ in range(4)))
            assert sorted(r for r in results if isinstance(r, int)) == [20], results
            assert results.count(grpc.StatusCode.INVALID_ARGUMENT) == 3, results
            assert await _generate(stub, same) == 20  # the id is free again once its request is over
            # With n=2 the outputs run as "fam-0" and "fam-1" on the workers: a request named "fam-1" must
            # not collide with them.
            family = stub.Generate(_greedy(list(range(10, 100)), 500, request_id="fam", n=2), timeout=60)
            await family.read()
            assert await _generate(stub, _greedy([5, 6, 7], 2, request_id="fam-1")) == (
                grpc.StatusCode.INVALID_ARGUMENT)
            family.cancel()

    asyncio.run(main())
    _assert_serving(server)


def test_abort_needs_the_owner(server: RunningServer) -> None:
    """Without a key, only the connection that started a request may abort it; with `authorization: Bearer KEY`,
    any connection with the same key. Anyone else is answered as for an unknown id (found = false)."""
    # Channels of one process share their connections unless told not to: these two are two clients.
    separate = [("grpc.use_local_subchannel_pool", 1)]
    owner = grpc.insecure_channel(server.grpc_target, options=separate)
    other = grpc.insecure_channel(server.grpc_target, options=separate)
    try:
        stream = pb_grpc.GenerationStub(owner).Generate(_greedy(list(range(10, 200)), 1000, "owned"), timeout=60)
        assert next(stream).HasField("chunk")
        assert not pb_grpc.GenerationStub(other).Abort(pb.AbortRequest(request_id="owned"), timeout=10).found
        assert next(stream).HasField("chunk")  # still running
        assert pb_grpc.GenerationStub(owner).Abort(pb.AbortRequest(request_id="owned"), timeout=10).found
        assert list(stream)[-1].complete.finish_reason == "abort"

        key = (("authorization", "Bearer key-one"),)
        stream = pb_grpc.GenerationStub(owner).Generate(_greedy(list(range(10, 200)), 1000, "keyed"), timeout=60,
                                                        metadata=key)
        next(stream)
        abort = pb_grpc.GenerationStub(other).Abort
        assert not abort(pb.AbortRequest(request_id="keyed"), timeout=10).found
        assert not abort(pb.AbortRequest(request_id="keyed"), timeout=10,
                         metadata=(("authorization", "Bearer key-two"),)).found
        assert abort(pb.AbortRequest(request_id="keyed"), timeout=10, metadata=key).found
        assert list(stream)[-1].complete.finish_reason == "abort"
    finally:
        owner.close()
        other.close()
    _assert_serving(server)


# ---- cancellation and metrics -----------------------------------------------------------------------------


def _prefill_busy(server: RunningServer) -> bool:
    report = server.load(check_integrity=False)
    return any(w.num_running or w.num_waiting or w.queued_prefill_tokens for w in report.workers
               if w.role == "prefill")


def test_cancel_before_the_first_token_stops_the_prefill(server: RunningServer) -> None:
    """8 long prompts, cancelled before their first token: the prefill worker drops them within about an engine
    step, rather than computing all of them for nobody (about 8 times the prefill of one)."""
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 8000) for _ in range(1500)] for _ in range(9)]
    started = time.monotonic()
    list(server.stub().Generate(_greedy(prompts.pop(), 1), timeout=120))
    one = time.monotonic() - started  # one prompt's prefill (a step of the engine), on this machine, now

    async def main() -> float:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            calls = [stub.Generate(_greedy(p, 1), timeout=120) for p in prompts]
            tasks = [asyncio.ensure_future(call.read()) for call in calls]
            deadline = time.monotonic() + 30
            while not await asyncio.to_thread(_prefill_busy, server):
                assert time.monotonic() < deadline, "the prefill worker never got the prompts"
                await asyncio.sleep(0.05)
            # GetLoad answers between engine steps: by now a step may have finished a prompt or two.
            assert sum(not t.done() for t in tasks) >= 5, "the prompts finished before they could be cancelled"
            for call in calls:
                call.cancel()
            cancelled = time.monotonic()
            await asyncio.gather(*tasks, return_exceptions=True)
            while await asyncio.to_thread(_prefill_busy, server):
                await asyncio.sleep(0.05)
            return time.monotonic() - cancelled

    # The step in progress, and perhaps the next, before the aborts land: a few times `one`, not 8 times.
    idle_after = asyncio.run(main())
    assert idle_after < 4 * one, f"the prefill worker took {idle_after:.2f}s to go idle; one prompt takes {one:.2f}s"
    _assert_serving(server)


def test_failures_and_tokens_are_counted_as_they_happen(server: RunningServer) -> None:
    before = _metric(server, "pdserve_request_failures_total", reason="invalid_request")
    err = _rpc_error(lambda: list(server.stub().Generate(_greedy([5, 99999], 2), timeout=30)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _metric(server, "pdserve_request_failures_total", reason="invalid_request") == before + 1

    generated = _metric(server, "pdserve_generation_tokens_total")
    stub = server.stub()
    stream = stub.Generate(_greedy(list(range(10, 200)), 1000, "counted"), timeout=60)
    received = 0
    while received < 8:
        received += len(next(stream).chunk.token_ids)
    assert _metric(server, "pdserve_generation_tokens_total") >= generated + received  # before the request ends
    assert stub.Abort(pb.AbortRequest(request_id="counted"), timeout=10).found
    list(stream)
