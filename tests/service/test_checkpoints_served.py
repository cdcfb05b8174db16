"""Checkpoints saved by transformers 5 give transformers' exact greedy answers through `pdserve serve` (issue 14).

Every case of tests/checkpoint_cases.py (both layouts, every family and every RoPE type), each served in
disagg mode with every prefill sent to the prefill worker, so the KV crosses UCX. Tokens are checked over gRPC
and, as text of the same tokens, over the OpenAI HTTP API.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import torch

from services.bench.offline import hf_generate, load_transformers
from services.engine.tokenizer import Tokenizer
from services.proto_gen import generation_pb2 as pb
from tests.checkpoint_cases import CHECKPOINT_CASES, NUM_OUT, case_prompts, write_case_model
from tests.service.conftest import RunningServer, start_server

SERVED_CASES = list(CHECKPOINT_CASES)


def _grpc_tokens(server: RunningServer, prompt: list[int]) -> list[int]:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True),
    )
    replies = list(server.stub().Generate(request, timeout=60))
    assert replies[-1].HasField("complete") and replies[-1].complete.finish_reason == "length"
    return [t for r in replies if r.HasField("chunk") for t in r.chunk.token_ids]


@pytest.mark.parametrize("name", SERVED_CASES)
def test_served_greedy_tokens_equal_transformers(make_test_model: Callable[..., Path], tmp_path: Path,
                                                 name: str) -> None:
    model = write_case_model(name, make_test_model, tmp_path)
    prompts = case_prompts()
    expected = hf_generate(load_transformers(str(model), "cpu", torch.float32), prompts, NUM_OUT)
    tokenizer = Tokenizer(str(model))
    server = start_server(tmp_path / "server", str(model), "--mode", "disagg", "--local-prefill-threshold", "0")
    try:
        server.wait_http_ready(60)
        client = openai.OpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0, timeout=60)
        for prompt, want in zip(prompts, expected, strict=True):
            assert _grpc_tokens(server, prompt) == want, f"gRPC: {len(prompt)}-token prompt differs"
            out = client.completions.create(model=name, prompt=prompt, temperature=0.0, max_tokens=NUM_OUT,
                                            extra_body={"ignore_eos": True})
            assert out.model == name
            assert out.usage is not None and out.usage.completion_tokens == NUM_OUT
            assert out.choices[0].text == tokenizer.decode(want), f"HTTP: {len(prompt)}-token prompt differs"
    finally:
        server.stop()
