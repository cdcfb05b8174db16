"""End to end through `pdserve serve`: real Ray actors, real UCX hand-off, real gRPC with generated stubs."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import pytest

from services.proto_gen import generation_pb2 as pb
from tests.service.conftest import RunningServer, start_server

NUM_REQUESTS = 16
MAX_TOKENS = 24


def _prompts(vocab: int = 8000) -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(10, vocab) for _ in range(48)]
    prompts = []
    for i in range(NUM_REQUESTS):
        n = rng.randint(1, 300)
        body = [rng.randrange(10, vocab) for _ in range(n)]
        prompts.append(shared + body if i % 4 == 0 else body)
    return prompts


def _greedy(ids: list[int], max_tokens: int = MAX_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )


@pytest.fixture(scope="module")
def expected(serve_model_dir: str) -> list[list[int]]:
    from services.engine import LLM, SamplingParams

    llm = LLM(serve_model_dir)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r.token_ids for r in llm.generate(_prompts(), params, use_tqdm=False)]


async def _collect(server: RunningServer, request: pb.GenerateRequest) -> tuple[list[int], list[pb.GenerateResponse]]:
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        from services.proto_gen import generation_pb2_grpc as pb_grpc

        stub = pb_grpc.GenerationStub(channel)
        responses = [r async for r in stub.Generate(request, timeout=120)]
    tokens = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    return tokens, responses


def _run_concurrently(server: RunningServer, requests: list[pb.GenerateRequest]) -> list[list[int]]:
    async def main() -> list[list[int]]:
        results = await asyncio.gather(*(_collect(server, r) for r in requests))
        return [tokens for tokens, _ in results]

    return asyncio.run(main())


def _assert_kv_whole(server: RunningServer) -> None:
    deadline = time.monotonic() + 10
    while True:
        report = server.load(check_integrity=True)
        busy = [w for w in report.workers if w.num_used_blocks or w.num_reservations or w.num_running]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for w in report.workers:
        assert w.alive, w.worker
        assert w.integrity_ok, f"{w.worker}: {w.integrity_error}"
        assert w.num_used_blocks == 0, f"{w.worker} still holds {w.num_used_blocks} blocks"
        assert w.num_reservations == 0, f"{w.worker} still holds {w.num_reservations} reservations"


def test_disagg_1p1d_matches_offline(disagg_server: RunningServer, expected: list[list[int]]) -> None:
    got = _run_concurrently(disagg_server, [_greedy(p) for p in _prompts()])
    assert got == expected
    _assert_kv_whole(disagg_server)


@pytest.mark.parametrize(
    "args",
    [
        ("--mode", "disagg", "--prefill-workers", "2", "--decode-workers", "1"),
        ("--mode", "disagg", "--prefill-workers", "1", "--decode-workers", "2"),
        ("--mode", "colocated", "--decode-workers", "1"),
    ],
    ids=["2p1d", "1p2d", "colocated"],
)
def test_other_shapes_match_offline(tmp_path, serve_model_dir: str, expected: list[list[int]], args) -> None:
    server = start_server(tmp_path, serve_model_dir, *args, "--local-prefill-threshold", "0")
    try:
        got = _run_concurrently(server, [_greedy(p) for p in _prompts()])
        assert got == expected
        _assert_kv_whole(server)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_a_float16_kv_cache_is_handed_off_and_matches_offline(tmp_path, serve_model_dir: str) -> None:
    """--kv-cache-dtype float16 under float32 weights: the prompt KV crosses from the prefill worker's float16
    cache to the decode worker's, and the tokens are those of the offline engine with the same cache."""
    from services.engine import LLM, SamplingParams

    llm = LLM(serve_model_dir, kv_cache_dtype="float16")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [r.token_ids for r in llm.generate(_prompts(), params, use_tqdm=False)]
    server = start_server(tmp_path, serve_model_dir, "--mode", "disagg", "--local-prefill-threshold", "0",
                          "--kv-cache-dtype", "float16")
    try:
        assert _run_concurrently(server, [_greedy(p) for p in _prompts()]) == want
        assert _transfer_counts(server) == {"ok": NUM_REQUESTS, "failed": 0}
        _assert_kv_whole(server)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_streaming_delivers_several_chunks(disagg_server: RunningServer) -> None:
    tokens, responses = asyncio.run(_collect(disagg_server, _greedy(list(range(100, 400)), max_tokens=64)))
    chunks = [r for r in responses if r.HasField("chunk") and r.chunk.token_ids]
    assert len(tokens) == 64
    assert len(chunks) >= 4, f"only {len(chunks)} chunks for 64 tokens"
    assert responses[-1].HasField("complete")
    assert responses[-1].complete.finish_reason == "length"
    assert responses[-1].complete.usage.completion_tokens == 64


def test_text_prompt_and_usage(disagg_server: RunningServer) -> None:
    request = pb.GenerateRequest(text="The harbor was quiet that morning", sampling=pb.SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))
    tokens, responses = asyncio.run(_collect(disagg_server, request))
    complete = responses[-1].complete
    assert len(tokens) == 8 and complete.usage.completion_tokens == 8
    assert complete.usage.prompt_tokens > 1
    assert "".join(r.chunk.text for r in responses if r.HasField("chunk"))


def test_prefix_cache_reported(disagg_server: RunningServer) -> None:
    prompt = list(range(1000, 1200))
    asyncio.run(_collect(disagg_server, _greedy(prompt, 2)))
    _, responses = asyncio.run(_collect(disagg_server, _greedy(prompt + [5, 6, 7], 2)))
    assert responses[-1].complete.usage.cached_tokens >= 192


def test_stop_string_and_seed(disagg_server: RunningServer) -> None:
    base = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(50, 90))),
                              sampling=pb.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    _, responses = asyncio.run(_collect(disagg_server, base))
    text = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        request = pb.GenerateRequest()
        request.CopyFrom(base)
        request.sampling.stop.append(stop)
        _, stopped = asyncio.run(_collect(disagg_server, request))
        stopped_text = "".join(r.chunk.text for r in stopped if r.HasField("chunk"))
        assert stop not in stopped_text and text.startswith(stopped_text)
        assert stopped[-1].complete.finish_reason == "stop"
    seeded = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(50, 90))),
                                sampling=pb.SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True))
    a, _ = asyncio.run(_collect(disagg_server, seeded))
    b, _ = asyncio.run(_collect(disagg_server, seeded))
    assert a == b
    _assert_kv_whole(disagg_server)


def test_abort_mid_stream_frees_kv(disagg_server: RunningServer) -> None:
    stub = disagg_server.stub()
    request = _greedy(list(range(10, 210)), max_tokens=1000)
    request.request_id = "to-abort"
    stream = stub.Generate(request, timeout=60)
    first = next(stream)
    assert first.HasField("chunk")
    assert stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=10).found
    rest = list(stream)
    assert rest[-1].complete.finish_reason == "abort"
    assert not stub.Abort(pb.AbortRequest(request_id="no-such-request"), timeout=10).found
    _assert_kv_whole(disagg_server)


def test_client_cancel_frees_kv(disagg_server: RunningServer) -> None:
    stub = disagg_server.stub()
    stream = stub.Generate(_greedy(list(range(10, 300)), max_tokens=1000), timeout=60)
    next(stream)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    _assert_kv_whole(disagg_server)


def test_deadline_expiry_frees_kv(disagg_server: RunningServer) -> None:
    stub = disagg_server.stub()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(_greedy(list(range(10, 300)), max_tokens=1500), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_kv_whole(disagg_server)


@pytest.mark.parametrize(
    ("request_msg", "needle"),
    [
        (pb.GenerateRequest(), "no input"),
        (pb.GenerateRequest(text=""), "empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 99999])), "outside the vocabulary"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 10), sampling=pb.SamplingParams(max_tokens=100000)),
         "exceeds the model's context"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=0)), "top_p"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_k=-2)), "top_k"),
        (pb.GenerateRequest(text="x" * (5 * 2**20)), "over the limit"),
    ],
    ids=["no-input", "empty-text", "empty-ids", "bad-token", "over-context", "max-tokens-0", "neg-temperature",
         "top-p-high", "top-p-zero", "top-k", "oversized"],
)
def test_bad_requests_are_invalid_argument(disagg_server: RunningServer, request_msg, needle: str) -> None:
    stub = disagg_server.stub()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_msg, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    # the server still serves
    assert len(asyncio.run(_collect(disagg_server, _greedy([1, 2, 3], 2)))[0]) == 2


def test_model_info_health_reflection(disagg_server: RunningServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    info = disagg_server.stub().GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.vocab_size == 8192 and info.mode == "disagg" and info.block_size == 64  # the CPU default
    channel = grpc.insecure_channel(disagg_server.grpc_target)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_transfer_timeout_recomputes(tmp_path, serve_model_dir: str, expected: list[list[int]]) -> None:
    """KV never arrives (injected): the decode worker times out and prefills itself; outputs are unchanged."""
    server = start_server(tmp_path, serve_model_dir, "--transfer-timeout-s", "1", "--local-prefill-threshold", "0",
                          env={"PDSERVE_FAULT": "drop_kv"})
    try:
        prompts = _prompts()[:4]
        assert _run_concurrently(server, [_greedy(p) for p in prompts]) == expected[:4]
        _assert_kv_whole(server)
        assert _transfer_counts(server)["failed"] == len(prompts)
    finally:
        server.stop()


def test_transfer_timeout_fail_policy(tmp_path, serve_model_dir: str) -> None:
    server = start_server(tmp_path, serve_model_dir, "--transfer-timeout-s", "1", "--local-prefill-threshold", "0",
                          "--transfer-failure-policy", "fail", env={"PDSERVE_FAULT": "drop_kv"})
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(server.stub().Generate(_greedy(list(range(10, 100)), 4), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        _assert_kv_whole(server)
    finally:
        server.stop()


def test_prefill_worker_killed_recomputes(tmp_path, serve_model_dir: str, expected: list[list[int]]) -> None:
    """The prefill actor dies (no restart): requests complete by recompute on the decode worker."""
    server = start_server(tmp_path, serve_model_dir, "--local-prefill-threshold", "0")
    try:
        report = server.load(check_integrity=False)
        prefill = next(w for w in report.workers if w.role == "prefill")
        _kill_worker(server, prefill.worker)
        prompts = _prompts()[:4]
        assert _run_concurrently(server, [_greedy(p) for p in prompts]) == expected[:4]
        # Ray restarts the actor; the router notices it is back (GetLoad: alive) and uses it again.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = next(w for w in server.load(check_integrity=False).workers if w.worker == prefill.worker)
            if now.alive and now.pid != prefill.pid:
                break
            time.sleep(0.5)
        assert now.alive and now.pid != prefill.pid
        before = _transfer_counts(server)
        assert _run_concurrently(server, [_greedy(p) for p in prompts]) == expected[:4]
        after = _transfer_counts(server)
        assert after["ok"] - before["ok"] == len(prompts), (before, after)
        assert after["failed"] == before["failed"], (before, after)
    finally:
        server.stop()


def test_sigterm_drains_in_flight(tmp_path, serve_model_dir: str) -> None:
    server = start_server(tmp_path, serve_model_dir, "--mode", "colocated")
    results: list[list[int]] = []

    def run() -> None:
        results.append(asyncio.run(_collect(server, _greedy(list(range(10, 200)), 200)))[0])

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    assert server.stop(timeout=90) == 0
    thread.join(30)
    assert results and len(results[0]) == 200


def _http_get(server: RunningServer, path: str) -> str:
    import httpx

    return httpx.get(server.http_base + path, timeout=10).text


def _transfer_counts(server: RunningServer) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"ok": 0.0, "failed": 0.0}
    for family in text_string_to_metric_families(_http_get(server, "/metrics")):
        for sample in family.samples:
            if sample.name == "pdserve_kv_transfer_seconds_count":
                counts["ok"] += sample.value
            elif sample.name == "pdserve_kv_transfer_failures_total":
                counts["failed"] += sample.value
    return counts


def _kill_worker(server: RunningServer, worker: str) -> None:
    import os
    import signal as sig

    os.kill(_worker_pid(server, worker), sig.SIGKILL)


def _worker_pid(server: RunningServer, worker: str) -> int:
    for w in server.load(False).workers:
        if w.worker == worker:
            return w.pid
    raise KeyError(worker)


def test_conditional_disaggregation(tmp_path, serve_model_dir: str) -> None:
    """A prompt whose uncached part is under the threshold is prefilled by the decode worker itself; with
    --local-prefill-backlog-tokens, so may long ones that arrive while the prefill worker is busy (which ones
    depends on timing: tests/unit/test_prefill_backlog.py pins the rule). Every output matches offline."""
    from prometheus_client.parser import text_string_to_metric_families

    from services.engine import LLM, SamplingParams

    short, longs = list(range(300, 320)), [list(range(400 + i, 600 + i)) for i in range(5)]
    llm = LLM(serve_model_dir)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [r.token_ids for r in llm.generate([short, *longs], params, use_tqdm=False)]
    server = start_server(tmp_path, serve_model_dir, "--local-prefill-threshold", "64",
                          "--local-prefill-backlog-tokens", "1")
    try:
        got = _run_concurrently(server, [_greedy(p, 8) for p in [short, *longs]])
        assert got == want
        decisions = {
            s.labels["decision"]: s.value
            for family in text_string_to_metric_families(_http_get(server, "/metrics"))
            for s in family.samples
            if s.name == "pdserve_disagg_decisions_total"
        }
        assert decisions["local_prefill"] == 1.0 and decisions["remote_prefill"] >= 1.0
        assert decisions["remote_prefill"] + decisions["local_prefill_backlog"] == 5.0
        _assert_kv_whole(server)
    finally:
        server.stop()
