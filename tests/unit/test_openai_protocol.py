"""services.router's openai_protocol, openai_fields, openai_logprobs and openai_format: requests to SamplingParams,
refusals by name, harmless fields, generation-config defaults, chat rendering, logprob formatting, and responses that
the openai client's own types accept."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk
from pydantic import ValidationError

from services.engine.errors import InvalidRequest
from services.engine.logprobs import TokenLogprob
from services.engine.tokenizer import Tokenizer
from services.router import openai_fields
from services.router.messages import Chunk, Completion
from services.router.openai_fields import REFUSED_CHAT, REFUSED_COMPLETION, RequestError
from services.router.openai_format import ChatFormat, CompletionFormat, LogprobOptions, Outputs
from services.router.openai_logprobs import TokenText
from services.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    chat_prompt_ids,
)
from services.router.openai_responses import Usage


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


# ---- requests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", ("hello", None)),
    ([5, 6, 7], (None, [5, 6, 7])),
    (["hello"], ("hello", None)),
    ([[5, 6]], (None, [5, 6])),
])
def test_prompt_forms(prompt: Any, expected: tuple[Any, Any]) -> None:
    assert completion(prompt=prompt).prompt_input() == expected


@pytest.mark.parametrize("prompt", ["", [], ["a", "b"], [[1], [2]], [""]])
def test_empty_or_batched_prompts_are_refused(prompt: Any) -> None:
    with pytest.raises(RequestError) as info:
        completion(prompt=prompt).prompt_input()
    assert info.value.param == "prompt"


@pytest.mark.parametrize("prompt", [["a", 1], [1.5], [True], None, {"text": "x"}])
def test_malformed_prompts_fail_validation(prompt: Any) -> None:
    with pytest.raises(ValidationError):
        completion(prompt=prompt)


def test_sampling_fields_map_to_sampling_params_including_extra_body() -> None:
    p = completion(temperature=0, top_p=0.5, max_tokens=7, stop="x", seed=3, top_k=4, ignore_eos=True,
                   stop_token_ids=[1, 2], n=3, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                   min_p=0.1, min_tokens=2, logit_bias={"5": 100, "7": -2.5}, logprobs=2,
                   prompt_logprobs=1).sampling_params()
    assert (p.temperature, p.top_p, p.max_tokens, p.stop, p.seed, p.top_k, p.ignore_eos, p.stop_token_ids) == (
        0, 0.5, 7, ("x",), 3, 4, True, (1, 2))
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == (
        3, 0.5, -1, 1.2, 0.1, 2)
    assert p.logit_bias == ((5, 100.0), (7, -2.5))
    assert (p.logprobs, p.prompt_logprobs) == (2, 1)
    assert completion(stop=["a", "b"]).sampling_params().stop == ("a", "b")


@pytest.mark.parametrize("seed", [-5, 0, 2**63 - 1, -(2**63)])
def test_seeds_cover_the_int64_range(seed: int) -> None:
    assert completion(seed=seed).sampling_params().seed == seed
    assert chat(seed=seed).sampling_params().seed == seed


def test_defaults_follow_openai_and_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    p = completion().sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop, p.seed, p.ignore_eos) == (
        1.0, 1.0, -1, None, (), None, False)
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == (
        1, 0, 0, 1, 0, 0)
    assert (p.logit_bias, p.logprobs, p.prompt_logprobs) == ((), None, None)
    assert chat().sampling_params().max_tokens is None


MODEL_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}


@pytest.mark.parametrize("make", [completion, chat])
def test_generation_config_defaults_fill_only_what_the_request_leaves_out(make: Any) -> None:
    p = make().sampling_params(MODEL_DEFAULTS)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.6, 0.9, 20, 0.05, 1.1)
    explicit = make(temperature=0, top_p=1, top_k=-1, min_p=0, repetition_penalty=1).sampling_params(MODEL_DEFAULTS)
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.min_p, explicit.repetition_penalty) == (
        0, 1, -1, 0, 1)
    null = make(temperature=None, top_k=None).sampling_params(MODEL_DEFAULTS)
    assert (null.temperature, null.top_k) == (0.6, 20)
    assert make().sampling_params({}).temperature == 1.0  # --generation-config vllm: OpenAI's defaults


def test_echo_with_logprobs_asks_for_the_prompt_logprobs() -> None:
    assert completion(echo=True, logprobs=1, max_tokens=1).sampling_params().prompt_logprobs == 1
    assert completion(echo=True, logprobs=0).sampling_params().prompt_logprobs == 0
    assert completion(echo=True, logprobs=1, prompt_logprobs=3).sampling_params().prompt_logprobs == 3
    assert completion(echo=True).sampling_params().prompt_logprobs is None
    assert completion(logprobs=2).sampling_params().prompt_logprobs is None


def test_chat_logprobs_and_top_logprobs() -> None:
    assert chat(logprobs=True).sampling_params().logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).sampling_params().logprobs == 5
    assert chat(logprobs=False, top_logprobs=0).sampling_params().logprobs is None
    assert chat().sampling_params().logprobs is None
    assert chat(prompt_logprobs=2).sampling_params().prompt_logprobs == 2


# Each refused field with a value that asks for the feature, and the same field at its "off" value.
REFUSED_COMPLETION_CASES = [
    ("best_of", 2, 1), ("use_beam_search", True, False), ("length_penalty", 0.5, 1.0), ("early_stopping", True, False),
    ("typical_p", 0.5, 1), ("bad_words", ["x"], []), ("allowed_token_ids", [1, 2], None),
    ("logits_processors", ["p"], []), ("truncate_prompt_tokens", 5, None), ("include_stop_str_in_output", True, False),
    ("skip_special_tokens", False, True), ("spaces_between_special_tokens", False, True),
    ("response_format", {"type": "json_object"}, {"type": "text"}), ("structured_outputs", {"json": {}}, {}),
    ("guided_json", {"type": "object"}, None), ("guided_regex", "a+", None), ("guided_choice", ["a"], None),
    ("guided_grammar", "root ::= x", None), ("return_tokens_as_token_ids", True, False),
    ("return_token_ids", True, False), ("vllm_xargs", {"a": 1}, {}), ("cache_salt", "s", None),
    ("suffix", "tail", ""), ("prompt_embeds", "AAAA", None),
]
REFUSED_CHAT_CASES = [
    ("echo", True, False), ("chat_template", "{{ x }}", None), ("functions", [{"name": "f"}], []),
    ("function_call", "auto", "none"), ("prediction", {"type": "content", "content": "x"}, None),
    ("reasoning_effort", "low", None), ("audio", {"voice": "alloy", "format": "wav"}, None),
    ("modalities", ["text", "audio"], ["text"]), ("web_search_options", {}, None),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "text"}),
    ("best_of", 3, None), ("guided_choice", ["yes", "no"], None), ("best_of", True, 1),
]


def test_every_refused_field_has_a_case() -> None:
    assert {name for name, _, _ in REFUSED_COMPLETION_CASES} == set(REFUSED_COMPLETION)
    assert {name for name, _, _ in REFUSED_CHAT_CASES} | set(REFUSED_COMPLETION) - {"suffix", "prompt_embeds"} == set(
        REFUSED_CHAT)


@pytest.mark.parametrize(("make", "name", "on", "off"), [
    *[(completion, *case) for case in REFUSED_COMPLETION_CASES], *[(chat, *case) for case in REFUSED_CHAT_CASES],
])
def test_unimplemented_fields_are_refused_by_name_unless_off(make: Any, name: str, on: Any, off: Any) -> None:
    with pytest.raises(RequestError) as info:
        make(**{name: on}).sampling_params()
    assert info.value.param == name and name in str(info.value)
    make(**{name: off}).sampling_params()
    make(**{name: None}).sampling_params()


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_chat_tool_calling_and_bad_logprobs_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        chat(**fields).sampling_params()
    assert info.value.param == param


def test_tools_without_tool_calls_are_accepted() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert chat(tools=tools, tool_choice="none").template_tools() == tools
    chat(tools=tools, tool_choice="none").sampling_params()
    for fields in ({"tools": [], "tool_choice": "auto"}, {"tool_choice": "none"}, {"tool_choice": "auto"}):
        req = chat(**fields)
        req.sampling_params()
        assert req.template_tools() is None


def test_harmless_unknown_fields_are_accepted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    openai_fields._ignored_logged.discard("some_future_field")
    openai_fields._ignored_logged.discard("stream_options.future_option")
    with caplog.at_level(logging.WARNING, logger=openai_fields.__name__):
        for _ in range(2):
            completion(user="u", some_future_field={"x": 1}, stream=True,
                       stream_options={"include_usage": True, "future_option": 1}).sampling_params()
            chat(some_future_field=3, metadata={"k": "v"}, store=False).sampling_params()
    logged = [r.getMessage() for r in caplog.records]
    assert sum("'some_future_field'" in m for m in logged) == 1
    assert sum("'stream_options.future_option'" in m for m in logged) == 1
    assert sum("'metadata'" in m for m in logged) <= 1


@pytest.mark.parametrize(("fields", "name"), [
    ({"n": 0}, "n"), ({"n": 129}, "n"), ({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"), ({"seed": 2**63}, "seed"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"), ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_bad_values_are_refused_with_the_field_named(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidRequest, match=name):
        completion(**fields).sampling_params()


@pytest.mark.parametrize("fields", [
    {"temperature": "0.5"}, {"max_tokens": True}, {"max_tokens": 1.5}, {"stream": "yes"}, {"n": "1"},
    {"stop": 3}, {"top_k": 2.0}, {"seed": 1.5}, {"logprobs": True}, {"echo": 1}, {"logit_bias": {"1": "x"}},
    {"min_tokens": 1.0}, {"stop_token_ids": [1.0]},
])
def test_wrong_types_fail_validation_instead_of_being_coerced(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        completion(**fields)


def test_include_usage_needs_stream() -> None:
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert not completion(stream=True).include_usage
    assert not completion(stream=True, stream_options={"include_usage": False}).include_usage


def test_chat_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5).sampling_params().max_tokens == 5
    assert chat(max_tokens=5, max_completion_tokens=9).sampling_params().max_tokens == 9


def test_chat_messages_keep_their_fields_for_the_template() -> None:
    req = chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "custom": [1, 2]},
    ])
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "custom": [1, 2]},
    ]
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(RequestError, match="image_url"):
        image.template_messages()
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"content": "x"}]):
        with pytest.raises(ValidationError):
            chat(messages=bad)


# ---- chat rendering and /tokenize ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


def test_completion_prompt_ids_honour_add_special_tokens_and_the_vocabulary(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hello")
    assert completion(prompt="hello").prompt_ids(tokenizer, 8192) == ("hello", ids)
    assert completion(prompt="hello", add_special_tokens=False).prompt_ids(tokenizer, 8192) == ("hello", ids[1:])
    assert completion(prompt=[[5, 6]]).prompt_ids(tokenizer, 8192) == (None, [5, 6])
    for bad in ([8192], [-1], [2**40]):
        with pytest.raises(RequestError, match="outside the vocabulary") as info:
            completion(prompt=bad).prompt_ids(tokenizer, 8192)
        assert info.value.param == "prompt"


def test_chat_prompt_has_exactly_one_bos(tokenizer: Tokenizer) -> None:
    bos_id = tokenizer.encode("x")[0]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith(tokenizer.bos_token or "\0")
    assert tokenizer.encode(rendered)[:2] == [bos_id, bos_id]  # what a naive encode would send
    ids = chat_prompt_ids(tokenizer, chat())
    assert ids[0] == bos_id and ids.count(bos_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    assert chat_prompt_ids(tokenizer, chat(add_special_tokens=True))[:2] == [bos_id, bos_id]  # asked for
    assert chat_prompt_ids(tokenizer, chat(add_special_tokens=False)) == ids


def test_chat_prompt_without_generation_prompt_and_continuing_the_final_message(tokenizer: Tokenizer) -> None:
    with_prompt = chat_prompt_ids(tokenizer, chat())
    without = chat_prompt_ids(tokenizer, chat(add_generation_prompt=False))
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    cont = chat_prompt_ids(tokenizer, chat(messages=messages, add_generation_prompt=False,
                                           continue_final_message=True))
    assert tokenizer.decode(cont, skip_special_tokens=False).endswith("<|end_header_id|>\n\nOnce upon")
    with pytest.raises(RequestError, match="continue_final_message"):
        chat_prompt_ids(tokenizer, chat(messages=messages, continue_final_message=True))  # with the generation prompt


def test_template_gets_documents_kwargs_tools_and_extra_message_fields(tiny_model: Path) -> None:
    template = ("{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ m.tool_call_id }}]{% endfor %}"
                "{% for d in documents or [] %}<{{ d.title }}>{% endfor %}{{ flavour }}"
                "{% for t in tools or [] %}({{ t.function.name }}){% endfor %}")
    tok = Tokenizer(tiny_model, chat_template=template)
    req = chat(messages=[{"role": "tool", "content": "42", "tool_call_id": "c9"}], documents=[{"title": "T"}],
               chat_template_kwargs={"flavour": "mint"}, tools=[{"type": "function", "function": {"name": "f"}}],
               tool_choice="none")
    text = tok.decode(chat_prompt_ids(tok, req), skip_special_tokens=False)
    assert text.endswith("[tool|42|c9]<T>mint(f)")
    with pytest.raises(RequestError, match="chat_template_kwargs cannot set"):
        chat_prompt_ids(tok, chat(chat_template_kwargs={"messages": []}))


def test_a_model_without_a_chat_template_is_a_clear_400(tiny_model: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(RequestError, match="no chat template") as info:
        chat_prompt_ids(Tokenizer(tmp_path), chat())
    assert info.value.param == "messages"


def test_tokenize_and_detokenize_requests(tokenizer: Tokenizer) -> None:
    plain = TokenizeCompletionRequest.model_validate({"prompt": "hello world"})
    ids = plain.token_ids(tokenizer)
    assert ids == tokenizer.encode("hello world")
    no_bos = TokenizeCompletionRequest.model_validate({"prompt": "hello world", "add_special_tokens": False})
    assert no_bos.token_ids(tokenizer) == ids[1:]
    messages = [{"role": "user", "content": "hi"}]
    assert TokenizeChatRequest.model_validate({"messages": messages}).token_ids(tokenizer) == chat_prompt_ids(
        tokenizer, chat(messages=messages))
    with pytest.raises(RequestError) as info:
        TokenizeCompletionRequest.model_validate({"prompt": "x", "return_token_strs": True}).token_ids(tokenizer)
    assert info.value.param == "return_token_strs"
    detok = DetokenizeRequest.model_validate({"tokens": ids})
    assert detok.text(tokenizer) == "<|begin_of_text|>hello world"
    for bad in ([tokenizer.vocab_size], [-1]):
        with pytest.raises(RequestError) as info:
            DetokenizeRequest.model_validate({"tokens": bad}).text(tokenizer)
        assert info.value.param == "tokens"


# ---- logprobs and responses ------------------------------------------------------------------------------


def entry(token_id: int, logprob: float, *top: tuple[int, float], rank: int = 1) -> TokenLogprob:
    return TokenLogprob(token_id, logprob, rank, tuple(top))


def test_legacy_logprobs_object(tokenizer: Tokenizer) -> None:
    text = TokenText(tokenizer)
    he, ll, o = tokenizer.encode("hello")[1:]
    out = text.legacy([he, ll, o], [None, entry(ll, -0.5, (ll, -0.5), (o, -1.5)),
                                    entry(o, -math.inf, (he, -0.1), (ll, -0.2), rank=9)], 2, 10)
    assert out.tokens == ["he", "ll", "o"]
    assert out.token_logprobs == [None, -0.5, -9999.0]
    assert out.top_logprobs == [None, {"ll": -0.5, "o": -1.5}, {"o": -9999.0, "he": -0.1, "ll": -0.2}]
    assert out.text_offset == [10, 12, 14]
    only_sampled = text.legacy([ll], [entry(ll, -0.5, (he, -0.1))], 0, 0)
    assert only_sampled.top_logprobs == [{"ll": -0.5}]


def test_chat_and_prompt_logprobs_formats(tokenizer: Tokenizer) -> None:
    text = TokenText(tokenizer)
    bos, he, ll = tokenizer.encode("hell")[:3]
    [content] = text.chat([entry(he, -0.25, (ll, -0.1), (he, -0.25), rank=2)], 1)
    assert (content.token, content.logprob, content.bytes) == ("he", -0.25, list(b"he"))
    assert [(t.token, t.logprob, t.bytes) for t in content.top_logprobs] == [("ll", -0.1, list(b"ll"))]
    prompt = text.prompt([None, entry(he, -3.0, (ll, -0.5), rank=4)], 1)
    assert prompt[0] is None
    assert {k: v.model_dump() for k, v in (prompt[1] or {}).items()} == {
        str(he): {"logprob": -3.0, "rank": 4, "decoded_token": "he"},
        str(ll): {"logprob": -0.5, "rank": 1, "decoded_token": "ll"}}
    assert text(bos) == "<|begin_of_text|>"


def test_outputs_interleave_and_sum_usage() -> None:
    outputs = Outputs(2)
    events = [Chunk([1], "a", 0), Chunk([2], "b", 1), Chunk([3, 4], "cd", 0), Completion("stop", 5, 3, 2, 0),
              Chunk([], "e", 1), Completion("length", 5, 4, 0, 1)]
    for event in events:
        assert not outputs.done
        outputs.add(event)
    assert outputs.done
    assert [(o.text, o.token_ids) for o in outputs.items] == [("acd", [1, 3, 4]), ("be", [2])]
    assert outputs.usage() == Usage.of(5, 7, 2)


def echo_request(tokenizer: Tokenizer, n: int = 2) -> tuple[CompletionFormat, Outputs, list[int]]:
    """A completions format for echo + logprobs=1 over "hello" with n outputs, and those outputs. As from the
    router, the prompt's logprobs come once, with output 0's first chunk."""
    prompt = tokenizer.encode("hello")
    fmt = CompletionFormat("cmpl-1", "alias", TokenText(tokenizer), n,
                           LogprobOptions(logprobs=1, prompt=1, echo_text="hello", prompt_ids=prompt))
    prompt_lp = [None, *[entry(t, -1.0 - i, (t, -1.0 - i), (7, -9.0)) for i, t in enumerate(prompt[1:])]]
    outputs = Outputs(n)
    for i in range(n):
        outputs.add(Chunk([prompt[1]], "he", i, [entry(prompt[1], -0.5, (prompt[2], -0.1), rank=2)],
                          prompt_lp if i == 0 else None))
        outputs.add(Completion("length", len(prompt), 1, 0, i))
    return fmt, outputs, prompt


def test_echo_with_logprobs_puts_the_prompt_first_as_lm_eval_reads_it(tokenizer: Tokenizer) -> None:
    fmt, outputs, prompt = echo_request(tokenizer)
    body = json.loads(fmt.response(outputs).model_dump_json())
    # The first prompt token has no logprob: null, as OpenAI and vLLM send (the client's type says float, but the
    # client does not validate responses).
    assert body["model"] == "alias" and [c["index"] for c in body["choices"]] == [0, 1]
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (4, 2)
    choice = body["choices"][0]
    assert choice["text"] == "hellohe"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<|begin_of_text|>", "he", "ll", "o", "he"]
    assert lp["token_logprobs"] == [None, -1.0, -2.0, -3.0, -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"he": -1.0}
    assert lp["top_logprobs"][-1] == {"he": -0.5, "ll": -0.1}
    assert lp["text_offset"] == [0, 17, 19, 21, 22]
    # lm-evaluation-harness: the continuation's log-likelihood is the sum over its tokens (the last, generated,
    # entry dropped), greedy when each token's logprob is its top_logprobs' largest.
    assert sum(lp["token_logprobs"][2:-1]) == -5.0
    continuation = zip(lp["token_logprobs"][2:-1], lp["top_logprobs"][2:-1], strict=True)
    assert all(t == max(top.values()) for t, top in continuation)
    prompt_lp = choice["prompt_logprobs"]
    assert prompt_lp[0] is None and prompt_lp[1][str(prompt[1])]["logprob"] == -1.0
    assert len(prompt_lp) == len(prompt)
    without_none = {**body, "choices": [{**c, "logprobs": None} for c in body["choices"]]}
    assert OpenAICompletion.model_validate(without_none).choices[1].text == "hellohe"


def test_streamed_completion_chunks_carry_index_and_their_tokens_logprobs(tokenizer: Tokenizer) -> None:
    he, ll, o = tokenizer.encode("hello")[1:]
    fmt = CompletionFormat("cmpl-1", "m", TokenText(tokenizer), 2, LogprobOptions(logprobs=0))
    first = fmt.chunk(Chunk([he], "he", 1, [entry(he, -0.5)]))
    held = fmt.chunk(Chunk([ll], "", 1, [entry(ll, -0.25)]))  # text held back, logprobs still sent
    nothing = fmt.chunk(Chunk([], "", 0))
    last = fmt.chunk(Chunk([o], "llo", 1, [entry(o, -0.125)]))
    assert nothing is None and first is not None and held is not None and last is not None
    chunks = [json.loads(c.model_dump_json()) for c in (first, held, last)]
    assert [c["choices"][0]["index"] for c in chunks] == [1, 1, 1]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [2], [4]]
    assert [c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks] == [[-0.5], [-0.25], [-0.125]]
    final = OpenAICompletion.model_validate(fmt.final(Completion("stop", 3, 3, 0, 1)).model_dump())
    assert final.choices[0].index == 1 and final.choices[0].finish_reason == "stop"
    with pytest.raises(RuntimeError, match="logprobs"):
        fmt.chunk(Chunk([he], "he", 0, None))  # asked for, but the workers sent none


def test_streamed_echo_comes_with_the_first_chunk_of_each_output(tokenizer: Tokenizer) -> None:
    fmt, outputs, prompt = echo_request(tokenizer, n=2)
    for out in outputs.items:  # output 1's chunk has no prompt logprobs of its own: output 0's serve
        first = fmt.chunk(Chunk(out.token_ids, out.text, out.index, out.logprobs,
                                outputs.prompt_logprobs if out.index == 0 else None))
        assert first is not None
        choice = json.loads(first.model_dump_json())["choices"][0]
        assert choice["text"] == "hellohe" and len(choice["logprobs"]["tokens"]) == len(prompt) + 1
    later = fmt.chunk(Chunk([prompt[2]], "ll", 0, [entry(prompt[2], -0.2)]))
    assert later is not None and json.loads(later.model_dump_json())["choices"][0]["text"] == "ll"
    plain = CompletionFormat("cmpl-2", "m", None, 1, LogprobOptions(echo_text="hi"))
    final = json.loads(plain.final(Completion("stop", 1, 0, 0, 0)).model_dump_json())
    assert final["choices"][0]["text"] == "hi"  # an output with no chunk still echoes


def test_completion_bodies_and_chunks_parse_as_the_openai_client_types() -> None:
    fmt = CompletionFormat("cmpl-1", "m")
    outputs = Outputs(1)
    outputs.add(Chunk([1, 2], "ab", 0))
    outputs.add(Completion("length", 3, 2, 1, 0))
    whole = OpenAICompletion.model_validate(fmt.response(outputs).model_dump())
    assert whole.choices[0].text == "ab" and whole.choices[0].finish_reason == "length"
    assert whole.choices[0].logprobs is None
    assert whole.usage is not None and whole.usage.total_tokens == 5
    assert whole.usage.prompt_tokens_details is not None and whole.usage.prompt_tokens_details.cached_tokens == 1
    last = OpenAICompletion.model_validate(json.loads(fmt.final(Completion("stop", 3, 2, 1, 0)).model_dump_json()))
    assert last.choices[0].text == "" and last.choices[0].finish_reason == "stop"
    # Mid-stream chunks carry finish_reason null, as OpenAI's own stream does (the client's type says otherwise).
    delta = fmt.chunk(Chunk([1], "a", 0))
    assert delta is not None
    assert json.loads(delta.model_dump_json())["choices"] == [
        {"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]
    tail = OpenAICompletion.model_validate(fmt.usage_chunk(Usage.of(3, 2, 1)).model_dump())
    assert tail.choices == [] and tail.usage == whole.usage


def test_chat_bodies_and_chunks_parse_as_the_openai_client_types(tokenizer: Tokenizer) -> None:
    he, y = tokenizer.encode("hey")[1:3]
    fmt = ChatFormat("chatcmpl-1", "m", TokenText(tokenizer), 2, LogprobOptions(logprobs=1))
    outputs = Outputs(2)
    for i in range(2):
        outputs.add(Chunk([he, y], "hey", i, [entry(he, -0.5, (he, -0.5)), entry(y, -1.0, (he, -0.75), rank=2)]))
        outputs.add(Completion("stop", 4, 2, 0, i))
    whole = OpenAIChatCompletion.model_validate(fmt.response(outputs).model_dump())
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[1].message.content == "hey" and whole.choices[1].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 4 and whole.usage.prompt_tokens == 4
    content = whole.choices[0].logprobs and whole.choices[0].logprobs.content
    assert content is not None and [(c.token, c.logprob) for c in content] == [("he", -0.5), ("y", -1.0)]
    assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [("he", -0.75)]
    stream = [*fmt.opening(), fmt.chunk(Chunk([he], "he", 1, [entry(he, -0.5)])), fmt.chunk(Chunk([], "", 1)),
              fmt.final(Completion("stop", 4, 1, 0, 1))]
    assert stream[3] is None
    chunks = [OpenAIChatCompletionChunk.model_validate(json.loads(c.model_dump_json())) for c in stream if c]
    assert [c.choices[0].index for c in chunks] == [0, 1, 1, 1]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[2].choices[0].delta.content == "he"
    lp = chunks[2].choices[0].logprobs
    assert lp is not None and lp.content is not None and lp.content[0].token == "he"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]
    tail = OpenAIChatCompletionChunk.model_validate(fmt.usage_chunk(Usage.of(4, 1, 0)).model_dump())
    assert tail.choices == [] and tail.usage is not None and tail.usage.completion_tokens == 1
    plain = ChatFormat("chatcmpl-2", "m")
    assert json.loads(plain.opening()[0].model_dump_json())["choices"][0]["logprobs"] is None
