"""The OpenAI-compatible request models, their validation, and their conversion to SamplingParams.

Requests accept what OpenAI's clients send plus vLLM's extras (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `prompt_logprobs`, chat template options) that clients pass through
`extra_body`. Fields a model does not declare are refused by name or ignored as openai_fields decides. Nothing here
knows about HTTP: the server maps InvalidRequest to 400 (with RequestError's `param` as the error's param).
Responses are built by openai_format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from services.engine.chat_template import ChatTemplateError
from services.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from services.engine.tokenizer import Tokenizer
from services.router.openai_fields import (
    REFUSED_CHAT,
    REFUSED_COMMON,
    REFUSED_COMPLETION,
    REFUSED_TOKENIZE,
    RequestError,
    check_extra_fields,
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False  # vLLM's; accepted, usage still comes once at the end


# Sampling fields a request may leave out (or send as null): the model's generation_config.json may set them,
# else SamplingParams' defaults (OpenAI's) apply.
DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty")


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    user: str | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    max_tokens: StrictInt | None = None
    prompt_logprobs: StrictInt | None = None
    # vLLM's extra sampling parameters (extra_body).
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[StrictInt] | None = None
    priority: StrictInt | None = 0

    refused_fields: ClassVar[Mapping[str, Callable[[Any], bool]]] = REFUSED_COMMON

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise RequestError("prompt_logprobs are not available when stream is true", "prompt_logprobs")
        check_extra_fields(self, self.refused_fields)
        if self.stream_options is not None:
            check_extra_fields(self.stream_options, {}, "stream_options.")

    def _sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                  defaults: Mapping[str, Any] | None) -> SamplingParams:
        """Explicit values win; a field left out (or null) takes the model's default, then OpenAI's."""
        picked = {name: value for name, value in (defaults or {}).items() if name in DEFAULTED_FIELDS}
        picked.update((name, getattr(self, name)) for name in DEFAULTED_FIELDS if getattr(self, name) is not None)
        return SamplingParams(
            **picked,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            n=1 if self.n is None else self.n,
            min_tokens=self.min_tokens or 0,
            logit_bias=self._logit_bias(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise RequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            pairs.append((int(key), bias))
        return tuple(pairs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is text, token ids, or a one-element list of either."""

    refused_fields = REFUSED_COMPLETION

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    add_special_tokens: StrictBool | None = True

    def sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Validates the request as a whole; max_tokens None means the rest of the context (as vLLM). With echo and
        logprobs the prompt's logprobs are asked for too (lm-evaluation-harness scores prompts this way)."""
        self._check_common()
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        return self._sampling(self.max_tokens, self.logprobs, prompt_logprobs, defaults)

    def prompt_input(self) -> tuple[str | None, list[int] | None]:
        """(text, None) or (None, token_ids); a batch of several prompts is refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError(f"prompt holds {len(prompt)} prompts; send one prompt per request", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        if isinstance(prompt, str):
            return prompt, None
        return None, [int(t) for t in prompt]  # type: ignore[arg-type]

    def prompt_ids(self, tokenizer: Tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
        """The prompt's text (None for token ids) and token ids, which must lie in [0, vocab_size)."""
        text, ids = self.prompt_input()
        if ids is None:
            assert text is not None
            ids = tokenizer.encode(text, add_special_tokens=self.add_special_tokens is not False)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
        return text, ids


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; fields beyond role and content (name, tool_calls, tool_call_id, ...) go to the template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise RequestError(f"only text content parts are supported, got {bad[0]!r}", "messages")
        return "".join(p.text or "" for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: every field, content flattened to text, and tool-call arguments
        parsed from their JSON string (templates write them with `tojson`), as vLLM passes them."""
        message = {**self.model_dump(exclude={"content"}, exclude_none=True), "content": self.text()}
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass
        return message


class _ChatInput(BaseModel):
    """A conversation and how to render it: shared by chat completions and /tokenize."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    # None: a BOS only where the template does not write one; true/false: add special tokens or not (vLLM's).
    add_special_tokens: StrictBool | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.tools or None


def chat_prompt_ids(tokenizer: Tokenizer, req: _ChatInput) -> list[int]:
    """Renders the model's chat template and tokenizes it. A template that writes the BOS text itself (Llama 3
    does) must not get a second BOS from the tokenizer's post-processor, so then no special tokens are added."""
    try:
        text = tokenizer.apply_chat_template(
            req.template_messages(), req.add_generation_prompt, continue_final_message=req.continue_final_message,
            tools=req.template_tools(), documents=req.documents, chat_template_kwargs=req.chat_template_kwargs)
    except ChatTemplateError as e:
        raise RequestError(f"cannot apply the chat template: {e}", "messages") from None
    add = req.add_special_tokens
    if add is None:
        bos = tokenizer.bos_token
        add = not (bos and text.startswith(bos))
    return tokenizer.encode(text, add_special_tokens=add)


class ChatCompletionRequest(_GenerationRequest, _ChatInput):
    """POST /v1/chat/completions. `max_completion_tokens` wins over the older `max_tokens`. Tools are rendered
    into the prompt only with tool_choice "none": pdserve does not parse tool calls out of the output."""

    refused_fields = REFUSED_CHAT

    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tool_choice: str | dict[str, Any] | None = None

    def sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        self._check_common()
        if self.tools and self.tool_choice != "none":
            raise RequestError('tools are only supported with tool_choice "none": pdserve does not parse tool '
                               "calls", "tools")
        if not self.tools and self.tool_choice not in (None, "none", "auto"):
            raise RequestError(f"tool_choice {self.tool_choice!r} needs tool calling, which pdserve does not "
                               "implement", "tool_choice")
        top = self.top_logprobs
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise RequestError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
        if top and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (top or 0) if self.logprobs else None, self.prompt_logprobs, defaults)

    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.tools if self.tools and self.tool_choice == "none" else None


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt (vLLM's shape)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        check_extra_fields(self, REFUSED_TOKENIZE)
        return tokenizer.encode(self.prompt, add_special_tokens=self.add_special_tokens)


class TokenizeChatRequest(_ChatInput):
    """POST /tokenize with messages: the prompt /v1/chat/completions would send for them."""

    model: str | None = None

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        check_extra_fields(self, REFUSED_TOKENIZE)
        return chat_prompt_ids(tokenizer, self)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[StrictInt]

    def text(self, tokenizer: Tokenizer) -> str:
        check_extra_fields(self, {})
        bad = next((t for t in self.tokens if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})", "tokens")
        return tokenizer.decode(self.tokens, skip_special_tokens=False)
