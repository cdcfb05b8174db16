"""Workers killed under load, through a real `pdserve serve` (real Ray actors, real UCX hand-off, real gRPC):
a decode worker killed mid-stream moves its streams to the other decode worker by token replay, exactly
(greedy against transformers, seeded against the offline engine); with --migration-limit 0 they fail with a
clear error instead; a prefill worker killed while it computes long prompts leaves them to be recomputed.
The killed worker is found by its pid in GetLoad; Ray restarts it. The unit twins are tests/unit/test_migration.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from typing import NamedTuple

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from services.bench.offline import hf_generate, load_transformers
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc
from tests.service.conftest import RunningServer, start_server

NUM_STREAMS = 6
STREAM_TOKENS = 160  # long enough that every stream is still running when a worker dies
KILL_AFTER = 8  # tokens each stream has received when the decode worker is killed
SEEDED = (0, 5)  # these two streams sample with a seed; the others are greedy
LONG_PROMPTS = 6
LONG_PROMPT_LEN = 1400
LONG_TOKENS = 8


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 7900) for _ in range(length)] for _ in range(count)]


STREAM_PROMPTS = _prompts(NUM_STREAMS, 40, 17)  # one length: transformers' batch needs no padding
LONG = _prompts(LONG_PROMPTS, LONG_PROMPT_LEN, 18)


def _request(i: int, ids: list[int], max_tokens: int) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if i in SEEDED:
        sampling = pb.SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i, max_tokens=max_tokens,
                                     ignore_eos=True)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling)


class Expected(NamedTuple):
    streams: list[list[int]]
    long: list[list[int]]


@pytest.fixture(scope="module")
def expected(serve_model_dir: str, torch_one_thread: None) -> Expected:
    """transformers' greedy output for the greedy streams and the long prompts; the offline engine's for the
    seeded streams (transformers samples differently)."""
    from services.engine import LLM, SamplingParams

    hf = load_transformers(serve_model_dir, "cpu", torch.float32)
    streams = hf_generate(hf, STREAM_PROMPTS, STREAM_TOKENS)
    long = hf_generate(hf, LONG, LONG_TOKENS)
    del hf
    llm = LLM(serve_model_dir)
    for i in SEEDED:
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i, max_tokens=STREAM_TOKENS, ignore_eos=True)
        streams[i] = llm.generate([STREAM_PROMPTS[i]], params, use_tqdm=False)[0].token_ids
    return Expected(streams, long)


def _server(tmp_path_factory: pytest.TempPathFactory, model: str, name: str, *args: str) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp(name), model, "--mode", "disagg", "--prefill-workers", "1",
                          "--decode-workers", "2", "--local-prefill-threshold", "0", *args)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture  # one test: gone before the other server starts, so the two never share the 2 cores
def migrating(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str) -> Iterator[RunningServer]:
    yield from _server(tmp_path_factory, serve_model_dir, "migrating")


@pytest.fixture(scope="module")
def not_migrating(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str) -> Iterator[RunningServer]:
    yield from _server(tmp_path_factory, serve_model_dir, "not-migrating", "--migration-limit", "0")


class Outcome(NamedTuple):
    tokens: list[int]
    error: grpc.RpcError | None


async def _stream(server: RunningServer, request: pb.GenerateRequest, enough: asyncio.Event) -> Outcome:
    tokens: list[int] = []
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        try:
            async for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=180):
                tokens += response.chunk.token_ids
                if len(tokens) >= KILL_AFTER:
                    enough.set()
        except grpc.aio.AioRpcError as e:
            enough.set()
            return Outcome(tokens, e)
    enough.set()
    return Outcome(tokens, None)


def _kill_busiest(server: RunningServer, role: str) -> pb.WorkerLoad:
    """SIGKILLs the worker of `role` with the most requests on it (running, waiting or queued for prefill)."""
    workers = [w for w in server.load(check_integrity=False).workers if w.role == role]
    busiest = max(workers, key=lambda w: (w.num_running + w.num_waiting, w.queued_prefill_tokens))
    assert busiest.num_running + busiest.num_waiting + busiest.queued_prefill_tokens > 0, workers
    os.kill(busiest.pid, signal.SIGKILL)
    return busiest


def _streams_with_a_decode_worker_killed(server: RunningServer) -> tuple[list[Outcome], pb.WorkerLoad]:
    async def main() -> tuple[list[Outcome], pb.WorkerLoad]:
        flags = [asyncio.Event() for _ in STREAM_PROMPTS]
        streams = [asyncio.ensure_future(_stream(server, _request(i, p, STREAM_TOKENS), flag))
                   for i, (p, flag) in enumerate(zip(STREAM_PROMPTS, flags, strict=True))]
        await asyncio.gather(*(flag.wait() for flag in flags))
        killed = await asyncio.to_thread(_kill_busiest, server, "decode")
        return list(await asyncio.gather(*streams)), killed

    return asyncio.run(main())


def _counter(server: RunningServer, name: str) -> float:
    import httpx

    text = httpx.get(server.http_base + "/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def _wait_back_and_whole(server: RunningServer, killed: pb.WorkerLoad) -> None:
    """Ray restarts the killed worker and the router polls it back; then no worker holds a block."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        report = server.load(check_integrity=True)
        again = next(w for w in report.workers if w.worker == killed.worker)
        busy = [w for w in report.workers if w.num_used_blocks or w.num_reservations or w.num_running]
        if again.alive and again.pid != killed.pid and not busy:
            break
        time.sleep(0.3)
    for w in report.workers:
        assert w.alive, f"{w.worker} is not back"
        assert w.integrity_ok, f"{w.worker}: {w.integrity_error}"
        assert w.num_used_blocks == 0, f"{w.worker} still holds {w.num_used_blocks} blocks"
        assert w.num_reservations == 0, f"{w.worker} still holds {w.num_reservations} reservations"
    assert next(w for w in report.workers if w.worker == killed.worker).pid != killed.pid


def test_a_killed_decode_workers_streams_continue_exactly(migrating: RunningServer, expected: Expected) -> None:
    outcomes, killed = _streams_with_a_decode_worker_killed(migrating)
    assert [o.error for o in outcomes] == [None] * NUM_STREAMS
    for i, (outcome, want) in enumerate(zip(outcomes, expected.streams, strict=True)):
        assert outcome.tokens == want, f"stream {i} differs from the un-failed output"
    migrations = _counter(migrating, "pdserve_request_migrations_total")
    assert 1 <= migrations <= NUM_STREAMS
    assert _counter(migrating, "pdserve_request_failures_total") == 0
    assert f"decode worker {killed.worker} died" in migrating.log()
    _wait_back_and_whole(migrating, killed)


def test_without_migration_the_streams_fail_clearly(not_migrating: RunningServer, expected: Expected) -> None:
    outcomes, killed = _streams_with_a_decode_worker_killed(not_migrating)
    failed = [o for o in outcomes if o.error is not None]
    assert failed, "no stream was on the killed decode worker"
    for outcome in failed:
        assert outcome.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "a worker failed" in (outcome.error.details() or "")
        assert len(outcome.tokens) >= KILL_AFTER
    for i, outcome in enumerate(outcomes):  # those on the other worker are untouched
        if outcome.error is None:
            assert outcome.tokens == expected.streams[i], i
    assert _counter(not_migrating, "pdserve_request_migrations_total") == 0
    assert _counter(not_migrating, "pdserve_request_failures_total") == len(failed)
    _wait_back_and_whole(not_migrating, killed)


def test_a_prefill_worker_killed_mid_prefill_leaves_the_prompts_recomputed(
    not_migrating: RunningServer, expected: Expected
) -> None:
    """Long prompts queue on the one prefill worker; it is killed while it computes them (and streams their KV).
    Under the default "recompute" policy each decode worker prefills them itself: every output is exact."""
    failures_before = _counter(not_migrating, "pdserve_kv_transfer_failures_total")

    async def main() -> tuple[list[Outcome], pb.WorkerLoad]:
        never = asyncio.Event()
        requests = [asyncio.ensure_future(_stream(not_migrating, _request(-1, p, LONG_TOKENS), never)) for p in LONG]
        while True:  # until the prefill worker has the prompts
            report = await asyncio.to_thread(not_migrating.load, False)
            prefill = next(w for w in report.workers if w.role == "prefill")
            if prefill.queued_prefill_tokens >= 2 * LONG_PROMPT_LEN:
                break
            assert not any(r.done() for r in requests), "the prompts were prefilled before the kill"
            await asyncio.sleep(0.05)
        killed = await asyncio.to_thread(_kill_busiest, not_migrating, "prefill")
        return list(await asyncio.gather(*requests)), killed

    outcomes, killed = asyncio.run(main())
    assert [o.error for o in outcomes] == [None] * LONG_PROMPTS
    assert [o.tokens for o in outcomes] == expected.long
    assert _counter(not_migrating, "pdserve_kv_transfer_failures_total") - failures_before >= 2
    _wait_back_and_whole(not_migrating, killed)
