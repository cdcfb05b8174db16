"""Sampling features of the OpenAI API on a real disagg `pdserve serve` (the first token sampled on the prefill
worker), driven only by the official openai client (vLLM's extras through extra_body; httpx for /tokenize and
/detokenize, which the client has no method for). Logprobs are checked against a float32 transformers forward pass,
sampled tokens against the offline engine (`services.engine.LLM`) on the same model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
import torch

from services.engine.llm import LLM, GenerationResult
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from tests.service.conftest import RunningServer
from tests.unit.test_openai_protocol import REFUSED_CHAT_CASES, REFUSED_COMPLETION_CASES

PROMPT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea, there "
          "lived an old fisherman who told stories")
MESSAGES: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "Tell me about the sea."}]
TOL = 1e-4


@pytest.fixture(scope="module")
def server(disagg_server: RunningServer) -> RunningServer:
    """The shared server once HTTP /health says ready (its workers are up)."""
    return disagg_server.wait_http_ready()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(serve_model_dir: str) -> Tokenizer:
    return Tokenizer(serve_model_dir)


@pytest.fixture(scope="module")
def reference(serve_model_dir: str, torch_one_thread: None) -> Any:
    from services.bench.offline import load_transformers

    return load_transformers(serve_model_dir, "cpu", torch.float32)


@pytest.fixture(scope="module")
def llm(serve_model_dir: str, torch_one_thread: None) -> LLM:
    return LLM(serve_model_dir, kv_cache_bytes=64 * 2**20, enforce_eager=True)


def ref_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the float32 log-distribution of the token after ids[: i + 1]."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def ref_greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """The reference's greedy tokens after `prompt`, and the log-distributions they were picked from."""
    ids: list[int] = []
    for _ in range(steps):
        ids.append(int(ref_logprobs(model, prompt + ids)[-1].argmax()))
    return ids, ref_logprobs(model, prompt + ids)[len(prompt) - 1 : -1]


def offline(llm: LLM, prompt: list[int], **params: Any) -> GenerationResult:
    [result] = llm.generate(prompt, SamplingParams(**params), use_tqdm=False)
    assert result.error is None, result.error
    return result


def tokenize(server: RunningServer, **payload: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.http_base}/tokenize", json=payload, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def check_top(top: dict[str, float], row: torch.Tensor, k: int, tokenizer: Tokenizer, sampled: str) -> None:
    """A legacy top_logprobs dict: the sampled token plus the k most likely, with the reference's values."""
    top_k = row.topk(k)
    pairs = zip(top_k.values.tolist(), top_k.indices.tolist(), strict=True)
    expected = {tokenizer.decode([i], skip_special_tokens=False): v for v, i in pairs}
    assert set(top) == set(expected) | {sampled}
    for token, logprob in expected.items():
        assert abs(top[token] - logprob) < TOL, (token, top[token], logprob)


# ---- logprobs --------------------------------------------------------------------------------------------


def test_completion_logprobs_match_a_float32_forward_pass(client: openai.OpenAI, model_name: str,
                                                          tokenizer: Tokenizer, reference: Any) -> None:
    prompt = tokenizer.encode(PROMPT)
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0, logprobs=5,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    ids, rows = ref_greedy(reference, prompt, 6)
    assert lp.tokens == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    for i, token_id in enumerate(ids):
        assert abs(lp.token_logprobs[i] - float(rows[i, token_id])) < TOL
        check_top(lp.top_logprobs[i], rows[i], 5, tokenizer, lp.tokens[i])
    stream = client.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0, logprobs=5,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in stream if c.choices and c.choices[0].logprobs]
    assert len(chunks) >= 2
    streamed = [t for c in chunks for t in (c.logprobs.tokens or [])]  # type: ignore[union-attr]
    offsets = [o for c in chunks for o in (c.logprobs.text_offset or [])]  # type: ignore[union-attr]
    values = [v for c in chunks for v in (c.logprobs.token_logprobs or [])]  # type: ignore[union-attr]
    assert (streamed, offsets) == (lp.tokens, lp.text_offset)
    assert max(abs(a - b) for a, b in zip(values, lp.token_logprobs, strict=True)) < TOL


def test_chat_logprobs_match_a_float32_forward_pass(server: RunningServer, client: openai.OpenAI, model_name: str,
                                                    tokenizer: Tokenizer, reference: Any) -> None:
    prompt = tokenize(server, messages=MESSAGES)["tokens"]
    out = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=5,  # type: ignore[arg-type]
                                         temperature=0, logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True})
    assert out.usage is not None and out.usage.prompt_tokens == len(prompt)
    content = out.choices[0].logprobs and out.choices[0].logprobs.content
    assert content is not None and len(content) == 5
    assert "".join(c.token for c in content) == out.choices[0].message.content
    ids, rows = ref_greedy(reference, prompt, 5)
    assert [c.token for c in content] == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    for row, c in zip(rows, content, strict=True):
        assert abs(c.logprob - float(row.max())) < TOL and c.bytes == list(c.token.encode())
        values, top_ids = row.topk(3)
        assert [t.token for t in c.top_logprobs] == [tokenizer.decode([int(i)], skip_special_tokens=False)
                                                     for i in top_ids]
        assert max(abs(t.logprob - float(v)) for t, v in zip(c.top_logprobs, values, strict=True)) < TOL
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=5,  # type: ignore
                                           temperature=0, extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


@pytest.mark.parametrize("as_ids", [True, False])
def test_echo_logprobs_score_the_prompt_as_lm_eval_does(client: openai.OpenAI, model_name: str,
                                                        tokenizer: Tokenizer, reference: Any, as_ids: bool) -> None:
    """lm-evaluation-harness' log-likelihood request; the second run finds the prompt in the prefix cache."""
    text = PROMPT + (" and songs" if as_ids else " and tales")
    prompt = tokenizer.encode(text)
    rows = ref_logprobs(reference, prompt)
    runs = [client.completions.create(model=model_name, prompt=prompt if as_ids else text, echo=True, logprobs=1,
                                      max_tokens=1, temperature=0) for _ in range(2)]
    for out in runs:
        choice = out.choices[0]
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
        assert len(lp.tokens) == len(prompt) + 1 and out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 1)
        assert choice.text == (tokenizer.decode(prompt) if as_ids else text) + lp.tokens[-1]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert abs(lp.token_logprobs[i] - float(rows[i - 1, prompt[i]])) < TOL, i
            check_top(lp.top_logprobs[i], rows[i - 1], 1, tokenizer, lp.tokens[i])
        assert abs(lp.token_logprobs[-1] - float(rows[-1].max())) < TOL  # the generated (greedy) token
        extra = choice.model_extra or {}
        prompt_lp = extra["prompt_logprobs"]
        assert prompt_lp[0] is None and len(prompt_lp) == len(prompt)
        assert abs(prompt_lp[1][str(prompt[1])]["logprob"] - float(rows[0, prompt[1]])) < TOL
    assert runs[0].choices[0].text == runs[1].choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_echo_logprobs_with_n_outputs_echo_the_prompt_in_each(client: openai.OpenAI, model_name: str,
                                                               tokenizer: Tokenizer, stream: bool) -> None:
    """The prompt's logprobs come once, with output 0; every choice still starts with the scored prompt."""
    prompt = tokenizer.encode(PROMPT + " and rhymes")
    out = client.completions.create(model=model_name, prompt=prompt, echo=True, logprobs=1, max_tokens=2, n=2,
                                    seed=3, stream=stream)
    chunks = list(out) if stream else [out]
    for index in range(2):
        parts = [c for chunk in chunks for c in chunk.choices if c.index == index]
        tokens = [t for c in parts if c.logprobs for t in c.logprobs.tokens or []]
        values = [v for c in parts if c.logprobs for v in c.logprobs.token_logprobs or []]
        assert len(tokens) == len(prompt) + 2 and values[0] is None, index
        assert "".join(c.text for c in parts).startswith(tokenizer.decode(prompt))


def test_vllm_prompt_logprobs_on_chat(server: RunningServer, client: openai.OpenAI, model_name: str,
                                      reference: Any) -> None:
    out = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=1,  # type: ignore[arg-type]
                                         extra_body={"prompt_logprobs": 2})
    prompt = tokenize(server, messages=MESSAGES)["tokens"]
    rows = ref_logprobs(reference, prompt)
    entries = (out.model_extra or {})["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt)
    for i in range(1, len(prompt)):
        own = entries[i][str(prompt[i])]
        assert abs(own["logprob"] - float(rows[i - 1, prompt[i]])) < TOL
        assert len(entries[i]) in (2, 3)


# ---- n, seeds, bias, penalties ----------------------------------------------------------------------------


def test_n_choices_with_a_seed_are_deterministic_and_follow_seed_plus_index(
        client: openai.OpenAI, model_name: str, tokenizer: Tokenizer, llm: LLM) -> None:
    prompt = tokenizer.encode(PROMPT)
    runs = [client.completions.create(model=model_name, prompt=prompt, n=3, seed=1234, temperature=1.0,
                                      max_tokens=8, extra_body={"ignore_eos": True}) for _ in range(2)]
    texts = [[c.text for c in sorted(run.choices, key=lambda c: c.index)] for run in runs]
    assert [c.index for c in runs[0].choices] == [0, 1, 2]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3
    for run in runs:
        assert run.usage is not None
        assert (run.usage.prompt_tokens, run.usage.completion_tokens) == (len(prompt), 24)
        assert run.usage.total_tokens == len(prompt) + 24
    for i, text in enumerate(texts[0]):
        assert text == offline(llm, prompt, temperature=1.0, seed=1234 + i, max_tokens=8, ignore_eos=True).text


async def test_streamed_n_chat_choices_carry_their_index(client: openai.OpenAI, aclient: openai.AsyncOpenAI,
                                                         model_name: str) -> None:
    params: dict[str, Any] = {"model": model_name, "messages": MESSAGES, "n": 2, "seed": 5, "max_tokens": 6,
                              "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**params)
    stream = await aclient.chat.completions.create(stream=True, stream_options={"include_usage": True}, **params)
    chunks = [c async for c in stream]
    texts = ["", ""]
    finished = []
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.append(choice.index)
    assert sorted(finished) == [0, 1]
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", [-5, 2**63 - 1, -(2**63)])
def test_int64_seeds_are_accepted_and_repeatable(client: openai.OpenAI, model_name: str, seed: int) -> None:
    runs = [client.completions.create(model=model_name, prompt=PROMPT, seed=seed, temperature=1.0, max_tokens=6)
            for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text


def test_logit_bias_forces_a_token(client: openai.OpenAI, model_name: str, tokenizer: Tokenizer) -> None:
    forced = tokenizer.encode(" sea", add_special_tokens=False)[0]
    out = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=4, logprobs=0,
                                    logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens == [tokenizer.decode([forced])] * 4
    unbiased = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=4, logprobs=0,
                                         extra_body={"ignore_eos": True})
    assert unbiased.choices[0].logprobs and unbiased.choices[0].logprobs.tokens != lp.tokens


OPENAI_FIELDS = ("temperature", "max_tokens", "seed", "presence_penalty", "frequency_penalty")  # the rest: extra_body
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")


@pytest.mark.parametrize("fields", [
    {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.8},
    {"min_p": 0.2, "temperature": 1.5, "seed": 11},
])
def test_penalties_and_min_p_change_the_output_as_the_engine_does(client: openai.OpenAI, model_name: str,
                                                                  tokenizer: Tokenizer, llm: LLM,
                                                                  fields: dict[str, Any]) -> None:
    """A random model seldom repeats itself, so a logit_bias makes one token frequent enough for the penalties to
    bite; the offline engine says what the greedy output then is."""
    prompt = tokenizer.encode(PROMPT)
    frequent = tokenizer.encode(" sea", add_special_tokens=False)[0]
    request = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True, **fields}
    bias = {} if "min_p" in fields else {frequent: 16.0}
    expected = offline(llm, prompt, logit_bias=bias, **request)
    plain = offline(llm, prompt, logit_bias=bias, **{k: v for k, v in request.items() if k not in PENALTIES})
    assert expected.token_ids != plain.token_ids  # the field changes this output, so the check below can fail
    native = {k: v for k, v in request.items() if k in OPENAI_FIELDS}
    extra = {k: v for k, v in request.items() if k not in OPENAI_FIELDS}
    out = client.completions.create(model=model_name, prompt=prompt, logit_bias={str(t): b for t, b in bias.items()},
                                    extra_body=extra, **native)
    assert out.choices[0].text == expected.text
    assert out.usage is not None and out.usage.completion_tokens == 24


def test_min_tokens_holds_back_stop_tokens(client: openai.OpenAI, model_name: str, tokenizer: Tokenizer,
                                           llm: LLM) -> None:
    prompt = tokenizer.encode(PROMPT)
    greedy = offline(llm, prompt, temperature=0, max_tokens=12, ignore_eos=True).token_ids
    stop = greedy[1]
    assert stop not in greedy[:1]

    def run(**extra: Any) -> tuple[Any, GenerationResult]:
        expected = offline(llm, prompt, temperature=0, max_tokens=12, stop_token_ids=(stop,), **extra)
        out = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=12,
                                        extra_body={"stop_token_ids": [stop], **extra})
        assert out.usage is not None and out.usage.completion_tokens == len(expected.token_ids)
        assert out.choices[0].text == expected.text and out.choices[0].finish_reason == expected.finish_reason
        return out, expected

    _, cut = run()
    assert len(cut.token_ids) == 2 and cut.finish_reason == "stop"
    _, held = run(min_tokens=6)
    assert len(held.token_ids) >= 6


# ---- /tokenize, /detokenize, names, refusals ---------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(server: RunningServer, client: openai.OpenAI, model_name: str,
                                            tokenizer: Tokenizer) -> None:
    base = server.http_base
    r = httpx.post(f"{base}/tokenize", json={"model": model_name, "prompt": PROMPT}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    max_len = client.models.list().data[0].model_extra["max_model_len"]  # type: ignore[index]
    assert body == {"count": len(body["tokens"]), "max_model_len": max_len, "tokens": tokenizer.encode(PROMPT),
                    "token_strs": None}
    back = httpx.post(f"{base}/detokenize", json={"model": model_name, "tokens": body["tokens"]}, timeout=30).json()
    assert back == {"prompt": tokenizer.decode(body["tokens"], skip_special_tokens=False)}
    assert back["prompt"].endswith(PROMPT)
    bare = httpx.post(f"{base}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}, timeout=30).json()
    assert bare["tokens"] == body["tokens"][1:]
    chat = httpx.post(f"{base}/tokenize", json={"messages": MESSAGES}, timeout=30).json()
    out = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    assert out.usage is not None and chat["count"] == out.usage.prompt_tokens
    cont = httpx.post(f"{base}/tokenize", json={"messages": [*MESSAGES, {"role": "assistant", "content": "Waves"}],
                                                "add_generation_prompt": False, "continue_final_message": True},
                      timeout=30).json()
    assert tokenizer.decode(cont["tokens"], skip_special_tokens=False).endswith("Waves")
    continued = client.chat.completions.create(
        model=model_name, messages=[*MESSAGES, {"role": "assistant", "content": "Waves"}], max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert continued.usage is not None and continued.usage.prompt_tokens == cont["count"]
    for path, payload, status in [("/detokenize", {"tokens": [10**6]}, 400), ("/detokenize", {"tokens": [-1]}, 400),
                                  ("/tokenize", {"model": "nope", "prompt": "x"}, 404), ("/tokenize", {}, 400)]:
        r = httpx.post(f"{base}{path}", json=payload, timeout=30)
        assert r.status_code == status, (path, payload, r.text)


def test_served_name_is_listed_required_and_echoed(client: openai.OpenAI, model_name: str) -> None:
    cards = client.models.list().data
    assert [c.id for c in cards] == [model_name] and (cards[0].model_extra or {})["root"] == model_name
    named = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=1)
    unnamed = client.completions.create(model="", prompt=PROMPT, max_tokens=1)
    assert named.model == unnamed.model == model_name
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=model_name + "-x", prompt=PROMPT, max_tokens=1)


@pytest.mark.parametrize(("endpoint", "name", "on", "off"), [
    *[("completions", *case) for case in REFUSED_COMPLETION_CASES],
    *[("chat", *case) for case in REFUSED_CHAT_CASES],
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], []),
    ("chat", "tool_choice", "required", "auto"),
])
def test_unimplemented_fields_are_400_by_name_and_accepted_when_off(client: openai.OpenAI, model_name: str,
                                                                    endpoint: str, name: str, on: Any,
                                                                    off: Any) -> None:
    def call(value: Any) -> Any:
        if endpoint == "completions":
            return client.completions.create(model=model_name, prompt="hi", max_tokens=1, extra_body={name: value})
        return client.chat.completions.create(model=model_name, messages=MESSAGES,  # type: ignore[arg-type]
                                              max_tokens=1, extra_body={name: value})

    with pytest.raises(openai.BadRequestError) as info:
        call(on)
    assert name in info.value.message and info.value.param == name
    assert call(off).choices


def test_unknown_harmless_fields_are_accepted(client: openai.OpenAI, model_name: str) -> None:
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2, temperature=0, user="me",
                                    extra_body={"some_future_field": {"a": 1}, "ignore_eos": True})
    assert out.usage is not None and out.usage.completion_tokens == 2
    chat = client.chat.completions.create(
        model=model_name, max_tokens=2, temperature=0, metadata={"k": "v"}, store=False,
        messages=[{"role": "user", "content": "hi", "custom_field": 3}],  # type: ignore[list-item, misc]
        stream=True, stream_options={"include_usage": True, "future_option": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True})
    assert [c.usage.completion_tokens for c in chat if c.usage] == [2]


# ---- afterwards ----------------------------------------------------------------------------------------------


def wait_until_idle(server: RunningServer, seconds: float) -> Any:
    """The load report once no worker holds KV, a reservation or a running request (or after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        report = server.load(check_integrity=True)
        busy = [w for w in report.workers if w.num_used_blocks or w.num_reservations or w.num_running]
        if (not busy and report.num_inflight_requests == 0) or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def assert_idle(report: Any) -> None:
    assert report.num_inflight_requests == 0, report
    for w in report.workers:
        assert w.alive and w.integrity_ok, f"{w.worker}: {w.integrity_error}"
        assert (w.num_used_blocks, w.num_reservations, w.num_running) == (0, 0, 0), w


async def test_a_client_leaving_n_outputs_at_the_first_token_frees_them(server: RunningServer,
                                                                        aclient: openai.AsyncOpenAI,
                                                                        model_name: str) -> None:
    """Outputs 1..n-1 start when output 0 has its first token: a client that leaves then cancels them while their
    decode reservations are being made, and those must be released too, not left to the lease."""
    stream = await aclient.completions.create(model=model_name, prompt=PROMPT, n=3, seed=1, max_tokens=500,
                                              stream=True, extra_body={"ignore_eos": True})
    async for _ in stream:
        break
    await stream.close()
    report = await asyncio.to_thread(wait_until_idle, server, 10)
    if report.num_inflight_requests or any(w.num_used_blocks or w.num_reservations for w in report.workers):
        await asyncio.to_thread(wait_until_idle, server, 40)  # past the lease, so later tests find a clean server
    assert_idle(report)


def test_the_workers_hold_no_kv_afterwards(server: RunningServer) -> None:
    """Runs last: every request above left no KV behind."""
    assert_idle(wait_until_idle(server, 10))
