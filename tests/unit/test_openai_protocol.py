"""services.router.openai_protocol: requests to SamplingParams, refusals, and responses that the openai client's
own types accept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk
from pydantic import ValidationError

from services.engine.errors import InvalidRequest
from services.engine.tokenizer import Tokenizer
from services.router.openai_protocol import (
    ChatCompletionRequest,
    ChatFormat,
    CompletionFormat,
    CompletionRequest,
    Usage,
    chat_prompt_ids,
)


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


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
    with pytest.raises(InvalidRequest):
        completion(prompt=prompt).prompt_input()


@pytest.mark.parametrize("prompt", [["a", 1], [1.5], [True], None, {"text": "x"}])
def test_malformed_prompts_fail_validation(prompt: Any) -> None:
    with pytest.raises(ValidationError):
        completion(prompt=prompt)


def test_sampling_fields_map_to_sampling_params_including_extra_body() -> None:
    p = completion(temperature=0, top_p=0.5, max_tokens=7, stop="x", seed=3, top_k=4, ignore_eos=True,
                   stop_token_ids=[1, 2]).sampling_params()
    assert (p.temperature, p.top_p, p.max_tokens, p.stop, p.seed, p.top_k, p.ignore_eos, p.stop_token_ids) == (
        0, 0.5, 7, ("x",), 3, 4, True, (1, 2))
    assert completion(stop=["a", "b"]).sampling_params().stop == ("a", "b")


def test_defaults_follow_openai_and_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    p = completion().sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop, p.seed, p.ignore_eos) == (
        1.0, 1.0, -1, None, (), None, False)
    assert chat().sampling_params().max_tokens is None


def test_unknown_and_harmless_fields_are_accepted() -> None:
    p = completion(user="u", logit_bias=None, presence_penalty=0, frequency_penalty=0.0, n=1, best_of=1,
                   some_future_field={"x": 1}).sampling_params()
    assert p.max_tokens is None


@pytest.mark.parametrize("fields", [
    {"n": 2}, {"n": 0}, {"echo": True}, {"logprobs": 1}, {"presence_penalty": 0.5}, {"frequency_penalty": -1},
    {"logit_bias": {"1": 5}}, {"best_of": 2}, {"repetition_penalty": 1.2}, {"suffix": "s"},
    {"stream_options": {"include_usage": True}},  # without stream
    {"top_p": 0}, {"temperature": -1}, {"max_tokens": 0}, {"seed": -1}, {"top_k": -2}, {"stop": [""]},
    {"stop_token_ids": [-1]},
])
def test_bad_or_unsupported_parameters_are_refused_by_name(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as info:
        completion(**fields).sampling_params()
    name = next(iter(fields))
    assert name in str(info.value) or name == "stream_options" and "stream" in str(info.value)


@pytest.mark.parametrize("fields", [
    {"temperature": "0.5"}, {"max_tokens": True}, {"max_tokens": 1.5}, {"stream": "yes"}, {"n": "1"},
    {"stop": 3}, {"top_k": 2.0},
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


@pytest.mark.parametrize("fields", [
    {"logprobs": True}, {"top_logprobs": 2}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"tool_choice": "required"}, {"response_format": {"type": "json_object"}}, {"n": 3},
])
def test_chat_features_pdserve_lacks_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        chat(**fields).sampling_params()


def test_chat_messages_content_parts_and_refusals() -> None:
    req = chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ])
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(InvalidRequest, match="image_url"):
        image.template_messages()
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"content": "x"}]):
        with pytest.raises(ValidationError):
            chat(messages=bad)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


def test_chat_prompt_has_exactly_one_bos(tokenizer: Tokenizer) -> None:
    bos_id = tokenizer.encode("x")[0]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith(tokenizer.bos_token or "\0")
    assert tokenizer.encode(rendered)[:2] == [bos_id, bos_id]  # what a naive encode would send
    ids = chat_prompt_ids(tokenizer, chat())
    assert ids[0] == bos_id and ids.count(bos_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered


def test_chat_prompt_without_generation_prompt(tokenizer: Tokenizer) -> None:
    with_prompt = chat_prompt_ids(tokenizer, chat())
    without = chat_prompt_ids(tokenizer, chat(add_generation_prompt=False))
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)


def test_completion_bodies_and_chunks_parse_as_the_openai_client_types() -> None:
    fmt = CompletionFormat("cmpl-1", "m")
    usage = Usage.of(3, 2, 1)
    whole = OpenAICompletion.model_validate(fmt.response("ab", "length", usage).model_dump())
    assert whole.choices[0].text == "ab" and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.total_tokens == 5
    assert whole.usage.prompt_tokens_details is not None and whole.usage.prompt_tokens_details.cached_tokens == 1
    last = OpenAICompletion.model_validate(json.loads(fmt.final("stop").model_dump_json()))
    assert last.choices[0].text == "" and last.choices[0].finish_reason == "stop"
    # Mid-stream chunks carry finish_reason null, as OpenAI's own stream does (the client's type says otherwise).
    delta = json.loads(fmt.delta("a").model_dump_json())
    assert delta["object"] == "text_completion" and delta["choices"] == [
        {"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]
    tail = OpenAICompletion.model_validate(fmt.usage_chunk(usage).model_dump())
    assert tail.choices == [] and tail.usage == whole.usage


def test_chat_bodies_and_chunks_parse_as_the_openai_client_types() -> None:
    fmt = ChatFormat("chatcmpl-1", "m")
    whole = OpenAIChatCompletion.model_validate(fmt.response("hey", "stop", Usage.of(4, 1, 0)).model_dump())
    assert whole.choices[0].message.content == "hey" and whole.choices[0].message.role == "assistant"
    chunks = [OpenAIChatCompletionChunk.model_validate(json.loads(c.model_dump_json()))
              for c in [*fmt.opening(), fmt.delta("he"), fmt.delta("y"), fmt.final("stop")]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hey"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]
    tail = OpenAIChatCompletionChunk.model_validate(fmt.usage_chunk(Usage.of(4, 1, 0)).model_dump())
    assert tail.choices == [] and tail.usage is not None and tail.usage.completion_tokens == 1
