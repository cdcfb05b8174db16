"""The OpenAI-compatible wire format: request models, response models, and their conversion to SamplingParams.

Requests accept what OpenAI's clients send, plus vLLM's extra sampling fields (`top_k`, `ignore_eos`,
`stop_token_ids`) that clients pass through `extra_body`. Unknown fields are ignored, as OpenAI and vLLM do;
a known field that asks for a feature pdserve does not have (`n` > 1, logprobs, penalties, tools, ...) is
refused with InvalidRequest, so a client never silently gets something other than what it asked for.
Nothing here knows about HTTP: the server maps InvalidRequest to 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from services.engine.errors import InvalidRequest
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer

# ---- requests ------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False  # vLLM's; accepted, usage still comes once at the end


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    user: str | None = None
    # vLLM's extra sampling parameters (extra_body).
    top_k: StrictInt | None = None
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[StrictInt] | None = None
    # Known but unsupported: accepted only at their "off" value.
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    min_p: StrictFloat | None = None
    min_tokens: StrictInt | None = None
    logit_bias: dict[str, Any] | None = None
    use_beam_search: StrictBool | None = None

    def _check_common(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest(f"n must be 1 (one choice per request), got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true")
        unsupported = {
            "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "repetition_penalty": self.repetition_penalty not in (None, 1),
            "min_p": self.min_p not in (None, 0),
            "min_tokens": self.min_tokens not in (None, 0),
            "logit_bias": bool(self.logit_bias),
            "use_beam_search": bool(self.use_beam_search),
        }
        _refuse(unsupported)

    def _sampling(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is text, token ids, or a one-element list of either."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt | None = None
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None

    def sampling_params(self) -> SamplingParams:
        """Validates the request as a whole; max_tokens None means the rest of the context (as vLLM)."""
        self._check_common()
        _refuse({"echo": bool(self.echo), "logprobs": self.logprobs is not None, "suffix": bool(self.suffix),
                 "best_of": self.best_of not in (None, 1)})
        return self._sampling(self.max_tokens)

    def prompt_input(self) -> tuple[str | None, list[int] | None]:
        """(text, None) or (None, token_ids); a batch of several prompts is refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequest(f"prompt holds {len(prompt)} prompts; send one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("the prompt is empty")
            return prompt, None
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        return None, [int(t) for t in prompt]  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise InvalidRequest(f"only text content parts are supported, got {bad[0]!r}")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions. `max_completion_tokens` wins over the older `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True  # vLLM's extra

    def sampling_params(self) -> SamplingParams:
        self._check_common()
        fmt = (self.response_format or {}).get("type", "text")
        _refuse({"logprobs": bool(self.logprobs), "top_logprobs": bool(self.top_logprobs),
                 "tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none", "auto"),
                 "response_format": fmt != "text"})
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens)

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: role and plain-text content."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def chat_prompt_ids(tokenizer: Tokenizer, req: ChatCompletionRequest) -> list[int]:
    """Renders the model's chat template and tokenizes it. A template that writes the BOS text itself (Llama 3
    does) must not get a second BOS from the tokenizer's post-processor, so then no special tokens are added."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(req.template_messages(), req.add_generation_prompt)
    except (ValueError, TemplateError) as e:
        raise InvalidRequest(f"cannot apply the chat template: {e}") from None
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def _refuse(flags: dict[str, bool]) -> None:
    names = [name for name, on in flags.items() if on]
    if names:
        raise InvalidRequest(f"unsupported parameter(s): {', '.join(names)} (pdserve does not implement them)")


# ---- responses -------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the whole response (object "text_completion") and each streamed chunk (same object name)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role": "assistant"} first, then {"content": ...}, {} with the finish_reason
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pdserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---- building responses ------------------------------------------------------------------------------------


class CompletionFormat:
    """Builds /v1/completions bodies and stream chunks for one request."""

    id_prefix = "cmpl"

    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model, self.created = request_id, model, now()

    def _chunk(self, text: str, finish_reason: str | None, usage: Usage | None = None) -> CompletionResponse:
        choices = [CompletionChoice(text=text, finish_reason=finish_reason)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self) -> list[BaseModel]:
        return []

    def delta(self, text: str) -> BaseModel:
        return self._chunk(text, None)

    def final(self, finish_reason: str) -> BaseModel:
        return self._chunk("", finish_reason)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return self._chunk(text, finish_reason, usage)


class ChatFormat(CompletionFormat):
    """Builds /v1/chat/completions bodies and stream chunks for one request."""

    id_prefix = "chatcmpl"

    def _delta_chunk(self, delta: dict[str, str], finish_reason: str | None) -> ChatCompletionChunk:
        choices = [ChatStreamChoice(delta=delta, finish_reason=finish_reason)]
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)

    def opening(self) -> list[BaseModel]:
        return [self._delta_chunk({"role": "assistant", "content": ""}, None)]

    def delta(self, text: str) -> BaseModel:
        return self._delta_chunk({"content": text}, None)

    def final(self, finish_reason: str) -> BaseModel:
        return self._delta_chunk({}, finish_reason)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                      usage=usage)
