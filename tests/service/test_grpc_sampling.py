"""The sampling features over gRPC, through `pdserve serve` in disaggregated mode (generated stubs).

The first token of a remote-prefilled request is sampled on the prefill worker and the rest on the decode
worker, so logprobs, n and penalties are checked across that hand-off. Logprobs are compared with a float32
transformers forward pass.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from services.proto_gen import generation_pb2 as pb
from tests.service.conftest import RunningServer

PROMPT = [(i * 37) % 7000 + 100 for i in range(70)]  # longer than the local-prefill threshold
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def reference(serve_model_dir: str):  # type: ignore[no-untyped-def]
    from services.bench.offline import load_transformers

    model = load_transformers(serve_model_dir, "cpu", torch.float32)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs


def _generate(server: RunningServer, sampling: pb.SamplingParams, prompt: list[int] = PROMPT,
              ) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
    return list(server.stub().Generate(request, timeout=120))


def _tokens(responses: list[pb.GenerateResponse], index: int = 0) -> list[int]:
    return [t for r in responses if r.HasField("chunk") and r.chunk.index == index for t in r.chunk.token_ids]


def test_logprobs_and_prompt_logprobs_match_transformers(disagg_server: RunningServer, reference) -> None:  # type: ignore[no-untyped-def]
    sampling = pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3,
                                 prompt_logprobs=2)
    responses = _generate(disagg_server, sampling)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    tokens = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(tokens) == MAX_TOKENS and [lp.token_id for lp in logprobs] == tokens
    expected = reference(PROMPT + tokens)
    for i, lp in enumerate(logprobs):
        row = expected[len(PROMPT) - 1 + i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert lp.rank == 1  # greedy picks the most likely token
        top = row.topk(3)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
        assert [t.logprob for t in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    prompt_lps = chunks[0].prompt_logprobs
    assert [lp.token_id for lp in prompt_lps] == PROMPT[1:]
    for pos, lp in enumerate(prompt_lps, start=1):
        assert lp.logprob == pytest.approx(expected[pos - 1][PROMPT[pos]].item(), abs=1e-4)
        assert len(lp.top) == 2
    assert all(not c.prompt_logprobs for c in chunks[1:])


def test_n_outputs_are_indexed_seeded_and_reproducible(disagg_server: RunningServer) -> None:
    sampling = pb.SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3, seed=-(2**63))
    first = _generate(disagg_server, sampling)
    again = _generate(disagg_server, sampling)
    outputs = [_tokens(first, i) for i in range(3)]
    assert outputs == [_tokens(again, i) for i in range(3)]
    assert all(len(o) == MAX_TOKENS for o in outputs) and len({tuple(o) for o in outputs}) > 1
    completes = [r.complete for r in first if r.HasField("complete")]
    assert sorted(c.index for c in completes) == [0, 1, 2]
    assert all(c.usage.completion_tokens == MAX_TOKENS for c in completes)
    # Output i of n is the single output with seed + i.
    single = pb.SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=-(2**63) + 2)
    assert _tokens(_generate(disagg_server, single)) == outputs[2]


def test_penalties_and_logit_bias_cross_the_hand_off(disagg_server: RunningServer, serve_model_dir: str) -> None:
    from services.engine import LLM, SamplingParams

    forced = 4321
    cases = [
        (pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logit_bias={forced: 100.0}),
         SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logit_bias={forced: 100.0})),
        (pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.5,
                           frequency_penalty=1.0, presence_penalty=0.5, min_p=0.1),
         SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.5,
                        frequency_penalty=1.0, presence_penalty=0.5, min_p=0.1)),
    ]
    llm = LLM(serve_model_dir, num_blocks=160)
    for proto, params in cases:
        got = _tokens(_generate(disagg_server, proto))
        assert got == llm.generate([PROMPT], params, use_tqdm=False)[0].token_ids
    assert _tokens(_generate(disagg_server, cases[0][0])) == [forced] * MAX_TOKENS


def test_unknown_fields_and_bad_values_are_refused(disagg_server: RunningServer) -> None:
    stub = disagg_server.stub()
    # A newer client's SamplingParams field 99 (varint 1): this server would drop it, so it says so.
    raw = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT)).SerializeToString() + b"\x22\x03\x98\x06\x01"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest.FromString(raw), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "99" in info.value.details()
    bad = [
        (pb.SamplingParams(min_p=1.5), "min_p"),
        (pb.SamplingParams(logprobs=21), "logprobs"),
        (pb.SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
        (pb.SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (pb.SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    ]
    for sampling, field in bad:
        with pytest.raises(grpc.RpcError) as info:
            _generate(disagg_server, sampling)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details(), field


def test_tokenize_and_detokenize(disagg_server: RunningServer) -> None:
    stub = disagg_server.stub()
    reply = stub.Tokenize(pb.TokenizeRequest(text="The harbor was quiet"), timeout=30)
    assert reply.ids and reply.max_model_len > 0
    assert stub.Detokenize(pb.DetokenizeRequest(ids=reply.ids), timeout=30).text == "The harbor was quiet"
    with pytest.raises(grpc.RpcError) as info:
        stub.Detokenize(pb.DetokenizeRequest(ids=[10**6]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_blocks_held_afterwards(disagg_server: RunningServer) -> None:
    report = disagg_server.load()
    assert all(w.integrity_ok and w.num_used_blocks == 0 and w.num_reservations == 0 for w in report.workers), report
