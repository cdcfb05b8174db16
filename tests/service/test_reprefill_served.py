"""A prefill worker killed while it prefills, through a real `pdserve serve` with two prefill workers (real Ray
actors, real UCX hand-off, real gRPC): the prompts it had are prefilled again on the other prefill worker, from a
fresh reservation on the decode worker, and every output is transformers' greedy one. The server runs the "fail"
policy, under which nothing else could save them: no decode worker recomputes a prompt there. The killed worker
is found by its pid in GetLoad; Ray restarts it. The unit twins are tests/unit/test_reprefill.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator

import pytest
import torch

from services.bench.offline import hf_generate, load_transformers
from services.proto_gen import generation_pb2 as pb
from tests.service.conftest import RunningServer, start_server
from tests.service.test_migration_served import Outcome, _counter, _stream, _wait_back_and_whole

LONG_PROMPTS = 8
LONG_PROMPT_LEN = 1400
LONG_TOKENS = 8


def _prompts() -> list[list[int]]:
    rng = random.Random(19)
    return [[rng.randrange(10, 7900) for _ in range(LONG_PROMPT_LEN)] for _ in range(LONG_PROMPTS)]


LONG = _prompts()


@pytest.fixture(scope="module")
def expected(serve_model_dir: str, torch_one_thread: None) -> list[list[int]]:
    return hf_generate(load_transformers(serve_model_dir, "cpu", torch.float32), LONG, LONG_TOKENS)


@pytest.fixture
def two_prefill_workers(tmp_path_factory: pytest.TempPathFactory, serve_model_dir: str) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("reprefill"), serve_model_dir, "--mode", "disagg",
                          "--prefill-workers", "2", "--decode-workers", "1", "--local-prefill-threshold", "0",
                          "--transfer-failure-policy", "fail")
    try:
        yield server
    finally:
        server.stop()


def _request(prompt: list[int]) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0, max_tokens=LONG_TOKENS, ignore_eos=True)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)


def test_a_killed_prefill_workers_prompts_are_prefilled_on_the_other(two_prefill_workers: RunningServer,
                                                                     expected: list[list[int]]) -> None:
    server = two_prefill_workers

    async def main() -> tuple[list[Outcome], pb.WorkerLoad]:
        never = asyncio.Event()
        requests = [asyncio.ensure_future(_stream(server, _request(p), never)) for p in LONG]
        # Until a prefill worker has two prompts or more still to compute: it is killed at once. A worker's load
        # is read between its steps, and its first step of 2,048 tokens leaves two and a half of its four.
        while True:
            report = await asyncio.to_thread(server.load, False)
            busy = [w for w in report.workers if w.role == "prefill" and w.queued_prefill_tokens >= 2 * LONG_PROMPT_LEN]
            if busy:
                break
            assert not any(r.done() for r in requests), "the prompts were prefilled before the kill"
            await asyncio.sleep(0.05)
        os.kill(busy[0].pid, signal.SIGKILL)
        return list(await asyncio.gather(*requests)), busy[0]

    outcomes, killed = asyncio.run(main())
    assert [o.error for o in outcomes] == [None] * LONG_PROMPTS
    assert [o.tokens for o in outcomes] == expected
    assert _counter(server, "pdserve_request_reprefills_total") >= 1
    assert _counter(server, "pdserve_request_failures_total") == 0
    assert f"prefill worker {killed.worker} failed" in server.log() and "prefilled again on prefill-" in server.log()
    _wait_back_and_whole(server, killed)
