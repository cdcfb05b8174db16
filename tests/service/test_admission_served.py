"""Admission and deadlines against a real `pdserve serve` (issue 17): a burst past the router's queue gets 429 with
Retry-After (the `openai` client) or RESOURCE_EXHAUSTED (grpc) at once while the admitted requests complete; a
request whose deadline passes (a gRPC deadline, HTTP's X-Request-Timeout) gets DEADLINE_EXCEEDED or 504, or an
error object in its stream; and every time, no KV block stays held and the server serves again.

One server for the module, with room for two of the burst's requests in the decode worker's KV (40 blocks of 16
tokens: 640; each request needs its 100-token prompt plus 120 output tokens) and two more waiting in the router.
The unit twins, with the timing edge cases, are in tests/unit/test_admission.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.proto_gen import generation_pb2 as pb
from tests.service.conftest import RunningServer, start_server

PROMPT = list(range(100, 200))  # 100 tokens
LONG = 120  # output tokens of a burst's request: 2 × (100 + 120) fit in 640 tokens, 3 do not
BURST = 6  # 2 admitted, 2 waiting, 2 refused
MODEL = "tiny"  # the served name: the model directory's
# The deadline of the tests that end a 400-token generation while it runs: 400 decode steps take about 1.2 s on
# a Zen 5 core at batch 1 (3 ms a step), and the first token comes within 0.1 s.
DEADLINE_S = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("admission"), serve_model_dir, "--mode", "disagg",
                          "--local-prefill-threshold", "0", "--max-model-len", "512", "--num-blocks", "40",
                          "--block-size", "16", "--max-queued-requests", "2")
    yield server.wait_http_ready()
    server.stop()


def _client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_base}/v1", api_key="none", max_retries=0, timeout=120)


def _greedy(max_tokens: int) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=sampling)


def _metric(server: RunningServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.http_base}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _assert_no_kv_held(server: RunningServer) -> None:
    """Every worker answers, passes check_integrity and, once the releases are over, holds no block."""
    for _ in range(150):
        report = server.load(check_integrity=True)
        assert all(w.alive and w.integrity_ok for w in report.workers), report
        idle = all(w.num_used_blocks == 0 and w.num_reservations == 0 for w in report.workers)
        if idle and report.num_inflight_requests == 0:  # the router's own teardown may end just after the client's
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"KV blocks still held: {report}")
    assert report.num_inflight_requests == 0
    assert _metric(server, "pdserve_router_admitted_requests") == 0
    assert _metric(server, "pdserve_router_queued_requests") == 0


def _assert_serving(server: RunningServer) -> None:
    usage = _client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage
    assert usage is not None and usage.completion_tokens == 2
    replies = list(server.stub().Generate(_greedy(2), timeout=60))
    assert replies[-1].complete.usage.completion_tokens == 2


def _error_body(error: openai.APIStatusError) -> dict[str, Any]:
    """OpenAI's error object of a refused request (the client keeps its "error" member as `body`)."""
    assert isinstance(error.body, dict), error.body
    return error.body


def _burst(send: Callable[[], Any]) -> list[tuple[float, Any]]:
    """Sends BURST requests at once; each gives (when it ended, its result or the exception it raised)."""

    def one() -> tuple[float, Any]:
        try:
            result = send()
        except Exception as e:  # noqa: BLE001 - the refusals are what the test looks at
            return time.monotonic(), e
        return time.monotonic(), result

    with ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(lambda _: one(), range(BURST)))


def test_an_http_burst_past_the_queue_gets_429_at_once(server: RunningServer) -> None:
    client = _client(server)
    before = _metric(server, "pdserve_request_failures_total", reason="resource_exhausted")
    results = _burst(lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LONG, temperature=0,
                                                       extra_body={"ignore_eos": True}))
    refused = [(t, r) for t, r in results if isinstance(r, openai.RateLimitError)]
    done = [(t, r) for t, r in results if not isinstance(r, Exception)]
    assert len(refused) == 2 and len(done) == BURST - 2, results
    for _, error in refused:
        assert error.status_code == 429
        assert int(error.response.headers["Retry-After"]) >= 1
        body = _error_body(error)
        assert body["type"] == "rate_limit_error" and "overloaded" in body["message"]
    assert all(r.usage.completion_tokens == LONG and r.choices[0].finish_reason == "length" for _, r in done)
    assert max(t for t, _ in refused) < min(t for t, _ in done)  # refused before any admitted one finished
    assert _metric(server, "pdserve_request_failures_total", reason="resource_exhausted") == before + 2
    _assert_no_kv_held(server)
    _assert_serving(server)


def test_a_grpc_burst_past_the_queue_gets_resource_exhausted_at_once(server: RunningServer) -> None:
    stub = server.stub()
    results = _burst(lambda: list(stub.Generate(_greedy(LONG), timeout=120)))
    refused = [(t, r) for t, r in results if isinstance(r, grpc.RpcError)]
    done = [(t, r) for t, r in results if not isinstance(r, Exception)]
    assert len(refused) == 2 and len(done) == BURST - 2, results
    for _, error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in error.details()
    assert all(r[-1].complete.usage.completion_tokens == LONG for _, r in done)
    assert max(t for t, _ in refused) < min(t for t, _ in done)
    _assert_no_kv_held(server)
    _assert_serving(server)


def test_a_grpc_deadline_ends_a_long_generation_and_frees_its_kv(server: RunningServer) -> None:
    replies = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in server.stub().Generate(_greedy(400), timeout=DEADLINE_S):
            replies.append(reply)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert replies and not any(r.HasField("complete") for r in replies)  # it had started, and never finished
    _assert_no_kv_held(server)
    _assert_serving(server)


def test_an_http_timeout_header_ends_a_long_generation_with_504(server: RunningServer) -> None:
    client = _client(server)
    before = _metric(server, "pdserve_request_deadline_exceeded_total", stage="running")
    with pytest.raises(openai.APIStatusError) as err:  # the client itself would wait 120 s: the server ends it
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, extra_body={"ignore_eos": True},
                                  extra_headers={"X-Request-Timeout": str(DEADLINE_S)})
    assert err.value.status_code == 504
    body = _error_body(err.value)
    assert body["code"] == "timeout" and f"deadline of {DEADLINE_S:g} s passed" in body["message"]
    _assert_no_kv_held(server)
    assert _metric(server, "pdserve_request_deadline_exceeded_total", stage="running") == before + 1


def test_an_http_stream_past_its_deadline_ends_with_an_error_object(server: RunningServer) -> None:
    stream = _client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True,
                                                extra_body={"ignore_eos": True},
                                                extra_headers={"X-Request-Timeout": str(DEADLINE_S)})
    texts = []
    with pytest.raises(openai.APIError, match=f"deadline of {DEADLINE_S:g} s passed while it ran"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts  # the 200 and some tokens went out before the deadline
    _assert_no_kv_held(server)


def test_a_bad_timeout_header_is_400(server: RunningServer) -> None:
    response = httpx.post(f"{server.http_base}/v1/completions", headers={"X-Request-Timeout": "soon"},
                          json={"prompt": PROMPT, "max_tokens": 1}, timeout=30)
    assert response.status_code == 400, response.text
    assert "X-Request-Timeout" in response.json()["error"]["message"]
