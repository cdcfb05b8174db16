"""The OpenAI-compatible wire format: request models, their conversion to SamplingParams, and response building.

Requests accept what OpenAI's clients send plus vLLM's extras (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, `prompt_logprobs`, chat template options) that clients pass through
`extra_body`. No field is dropped silently: a field that would change the output and that pdserve does not
implement (structured output, beam search, tool calling, ...) is refused by name unless it holds its "off" value;
any other unknown field is harmless, accepted and logged once per name. Nothing here knows about HTTP: the server
maps InvalidRequest to 400 (with RequestError's `param` as the error's param).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, StrictBool, StrictFloat, StrictInt

from services.engine.chat_template import ChatTemplateError
from services.engine.errors import InvalidRequest
from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from services.engine.tokenizer import Tokenizer
from services.router.router import Chunk, Completion, Event

log = logging.getLogger(__name__)


class RequestError(InvalidRequest):
    """An InvalidRequest about one request field, which the error body names as its `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ---- refused and ignored fields ----------------------------------------------------------------------------


def _off(*values: Any) -> Callable[[Any], bool]:
    """Whether a value is one of `values` with the same JSON type (so true is not 1 and 1.5 is not 1)."""
    return lambda v: any(type(v) is type(o) and v == o for o in values)


_NONE = _off(None)
_FALSE = _off(None, False)
_ONE = _off(None, 1, 1.0)

# Fields pdserve does not implement, by name, with the test for their "off" value (accepted, as if left out).
REFUSED_COMMON: dict[str, Callable[[Any], bool]] = {
    "best_of": _off(None, 1),
    "use_beam_search": _FALSE,
    "length_penalty": _ONE,
    "early_stopping": _FALSE,
    "typical_p": _ONE,
    "bad_words": _off(None, []),
    "allowed_token_ids": _NONE,
    "logits_processors": _off(None, []),
    "truncate_prompt_tokens": _NONE,
    "include_stop_str_in_output": _FALSE,
    "skip_special_tokens": _off(None, True),
    "spaces_between_special_tokens": _off(None, True),
    "response_format": _off(None, {"type": "text"}),
    "structured_outputs": _off(None, {}),
    "guided_json": _NONE,
    "guided_regex": _NONE,
    "guided_choice": _NONE,
    "guided_grammar": _NONE,
    "return_tokens_as_token_ids": _FALSE,
    "return_token_ids": _FALSE,
    "vllm_xargs": _off(None, {}),
    "cache_salt": _NONE,  # a promise of cache isolation pdserve cannot keep
}
REFUSED_COMPLETION = {**REFUSED_COMMON, "suffix": _off(None, ""), "prompt_embeds": _NONE}
REFUSED_CHAT = {
    **REFUSED_COMMON,
    "echo": _FALSE,
    "chat_template": _NONE,
    "functions": _off(None, []),
    "function_call": _off(None, "none"),
    "prediction": _NONE,
    "reasoning_effort": _NONE,
    "audio": _NONE,
    "modalities": _off(None, ["text"]),
    "web_search_options": _NONE,
}
REFUSED_TOKENIZE = {"chat_template": _NONE, "return_token_strs": _FALSE}

_ignored_logged: set[str] = set()  # unknown field names already logged


def check_extra_fields(model: BaseModel, refused: Mapping[str, Callable[[Any], bool]], prefix: str = "") -> None:
    """Refuses, by name, the fields of `refused` a request sets to something other than their off value; logs
    (once per name) the other fields the model does not declare, which are harmless and ignored."""
    extra = model.model_extra or {}
    bad = [name for name, is_off in refused.items() if name in extra and not is_off(extra[name])]
    if bad:
        value = repr(extra[bad[0]])
        value = value if len(value) <= 80 else value[:77] + "..."
        raise RequestError(
            f"unsupported parameter(s): {', '.join(bad)} (pdserve does not implement them; got {bad[0]}={value}; "
            "leave them out or send their default)",
            param=bad[0],
        )
    for name in extra:
        qualified = prefix + name
        if name not in refused and qualified not in _ignored_logged:
            _ignored_logged.add(qualified)
            log.warning("ignoring the unknown request field %r (pdserve does not use it)", qualified)


# ---- requests ------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = False
    continuous_usage_stats: StrictBool | None = False  # vLLM's; accepted, usage still comes once at the end


# Sampling fields a request may leave out and the model's generation_config.json may then set.
DEFAULTED_FIELDS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0}


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
        picked = {name: getattr(self, name) for name in DEFAULTED_FIELDS}
        for name, value in picked.items():
            if value is None:
                picked[name] = (defaults or {}).get(name, DEFAULTED_FIELDS[name])
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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object; the lists run in step, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry, keyed by token id: the prompt token's own and its top alternatives."""

    logprob: float
    rank: int
    decoded_token: str


PromptLogprobsOut = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponseChoice(CompletionChoice):
    prompt_logprobs: PromptLogprobsOut | None = None  # vLLM's


class CompletionResponse(BaseModel):
    """Both the whole response (object "text_completion") and each streamed chunk (same object name)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[SerializeAsAny[CompletionChoice]]  # CompletionResponseChoice in the whole response
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobsOut | None = None  # vLLM's


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role": "assistant"} first, then {"content": ...}, {} with the finish_reason
    logprobs: ChatLogprobs | None = None
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


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---- logprobs in the wire formats ------------------------------------------------------------------------

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


class TokenText:
    """Each token id's own text, special tokens included (cached: the formats ask for the same ids often)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def legacy(self, ids: list[int], entries: list[TokenLogprob | None], top: int, offset: int) -> CompletionLogprobs:
        """The legacy object for these tokens, the first at text offset `offset`. top_logprobs holds the token's own
        and its `top` most likely alternatives (as vLLM: up to top + 1 entries); an entry None (a prompt's first
        token) has no logprob."""
        out = CompletionLogprobs()
        for token_id, entry in zip(ids, entries, strict=True):
            text = self(token_id)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_clamp(entry.logprob))
            alternatives = {text: _clamp(entry.logprob)}
            for alt_id, logprob in entry.top[:top]:
                alternatives.setdefault(self(alt_id), _clamp(logprob))
            out.top_logprobs.append(alternatives)
        return out

    def chat(self, entries: list[TokenLogprob], top: int) -> list[ChatTokenLogprob]:
        return [ChatTokenLogprob(**self._top(e.token_id, e.logprob).model_dump(),
                                 top_logprobs=[self._top(i, lp) for i, lp in e.top[:top]]) for e in entries]

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self(token_id)
        return TopLogprob(token=text, logprob=_clamp(logprob), bytes=list(text.encode("utf-8", errors="replace")))

    def prompt(self, entries: PromptLogprobs, top: int) -> PromptLogprobsOut:
        """vLLM's prompt_logprobs: per prompt token, {token id: {logprob, rank, decoded_token}}, its own first."""
        out: PromptLogprobsOut = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            ranked = {str(e.token_id): PromptLogprob(logprob=_clamp(e.logprob), rank=e.rank,
                                                     decoded_token=self(e.token_id))}
            for rank, (alt_id, logprob) in enumerate(e.top[:top], start=1):
                ranked.setdefault(str(alt_id), PromptLogprob(logprob=_clamp(logprob), rank=rank,
                                                             decoded_token=self(alt_id)))
            out.append(ranked)
        return out


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


# ---- collecting outputs ----------------------------------------------------------------------------------


@dataclass
class Output:
    """One of a request's n outputs, as the router's events built it."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    done: Completion | None = None


class Outputs:
    """The n outputs of one request, filled from the router's interleaved events."""

    def __init__(self, n: int) -> None:
        self.items = [Output(i) for i in range(n)]

    def add(self, event: Event) -> Output:
        out = self.items[event.index]
        if isinstance(event, Chunk):
            out.text += event.text
            out.token_ids += event.token_ids
            out.logprobs += event.logprobs or []
            if event.prompt_logprobs is not None and out.prompt_logprobs is None:
                out.prompt_logprobs = event.prompt_logprobs
        else:
            out.done = event
        return out

    @property
    def done(self) -> bool:
        return all(o.done is not None for o in self.items)

    def usage(self) -> Usage:
        """The prompt counted once, completion tokens summed over the outputs."""
        ends = [o.done for o in self.items if o.done is not None]
        return Usage.of(ends[0].prompt_tokens, sum(e.completion_tokens for e in ends), ends[0].cached_tokens)


# ---- building responses ------------------------------------------------------------------------------------


@dataclass
class LogprobOptions:
    """What a request asked to see: `logprobs` top alternatives per sampled token (None: no logprobs), the prompt's
    logprobs with `prompt` alternatives, and for completions the echoed prompt (text and ids)."""

    logprobs: int | None = None
    prompt: int | None = None
    echo_text: str | None = None
    prompt_ids: list[int] = field(default_factory=list)


class CompletionFormat:
    """Builds /v1/completions bodies and stream chunks for one request."""

    id_prefix = "cmpl"

    def __init__(self, request_id: str, model: str, tokens: TokenText | None = None, n: int = 1,
                 options: LogprobOptions | None = None) -> None:
        self.id, self.model, self.created = request_id, model, now()
        self.tokens, self.n, self.options = tokens, n, options or LogprobOptions()
        if self.tokens is None and (self.options.logprobs is not None or self.options.prompt is not None):
            raise ValueError("a format with logprobs needs the TokenText")
        self._offsets = [0] * n  # text offset of each output's next token (legacy logprobs)
        self._started = [False] * n

    def opening(self) -> list[BaseModel]:
        return []

    def chunk(self, event: Chunk) -> BaseModel | None:
        """The stream chunk for new tokens of one output; None when it would carry nothing."""
        out = Output(event.index, event.text, event.token_ids, event.logprobs or [], event.prompt_logprobs)
        text, logprobs = self._choice_parts(out, first=not self._started[event.index])
        self._started[event.index] = True
        if not text and logprobs is None:
            return None
        return self._chunk(CompletionChoice(index=event.index, text=text, logprobs=logprobs))

    def final(self, done: Completion) -> BaseModel:
        text = "" if self._started[done.index] else self.options.echo_text or ""
        self._started[done.index] = True
        return self._chunk(CompletionChoice(index=done.index, text=text, finish_reason=done.finish_reason))

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, outputs: Outputs) -> BaseModel:
        choices: list[CompletionChoice] = []
        for out in outputs.items:
            assert out.done is not None
            text, logprobs = self._choice_parts(out, first=True)
            prompt = None
            if self.options.prompt is not None and out.prompt_logprobs is not None:
                assert self.tokens is not None
                prompt = self.tokens.prompt(out.prompt_logprobs, self.options.prompt)
            choices.append(CompletionResponseChoice(index=out.index, text=text, logprobs=logprobs,
                                                    finish_reason=out.done.finish_reason, prompt_logprobs=prompt))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=outputs.usage())

    def _chunk(self, choice: CompletionChoice) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _choice_parts(self, out: Output, first: bool) -> tuple[str, CompletionLogprobs | None]:
        """The text of new tokens of an output and their legacy logprobs; the echoed prompt comes first."""
        opts = self.options
        echo = first and opts.echo_text is not None
        text = (opts.echo_text or "") + out.text if echo else out.text
        if opts.logprobs is None or not (out.token_ids or echo):
            return text, None
        assert self.tokens is not None
        ids = list(out.token_ids)
        entries: list[TokenLogprob | None] = [*_entries(out.logprobs, len(out.token_ids))]
        if echo:
            if out.prompt_logprobs is None:
                raise RuntimeError("echo with logprobs, but the workers sent no prompt logprobs")
            ids, entries = opts.prompt_ids + ids, [*out.prompt_logprobs, *entries]
        logprobs = self.tokens.legacy(ids, entries, opts.logprobs, self._offsets[out.index])
        if logprobs.tokens:
            self._offsets[out.index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        return text, logprobs


class ChatFormat(CompletionFormat):
    """Builds /v1/chat/completions bodies and stream chunks for one request."""

    id_prefix = "chatcmpl"

    def _delta_chunk(self, index: int, delta: dict[str, str], finish_reason: str | None = None,
                     logprobs: ChatLogprobs | None = None) -> ChatCompletionChunk:
        choices = [ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)]
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)

    def opening(self) -> list[BaseModel]:
        return [self._delta_chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n)]

    def chunk(self, event: Chunk) -> BaseModel | None:
        logprobs = self._logprobs(event.logprobs, len(event.token_ids)) if event.token_ids else None
        if not event.text and logprobs is None:
            return None
        return self._delta_chunk(event.index, {"content": event.text}, logprobs=logprobs)

    def final(self, done: Completion) -> BaseModel:
        return self._delta_chunk(done.index, {}, done.finish_reason)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def response(self, outputs: Outputs) -> BaseModel:
        choices = []
        for out in outputs.items:
            assert out.done is not None
            logprobs = self._logprobs(out.logprobs, len(out.token_ids))
            choices.append(ChatChoice(index=out.index, message=AssistantMessage(content=out.text), logprobs=logprobs,
                                      finish_reason=out.done.finish_reason))
        prompt = None
        first = outputs.items[0].prompt_logprobs
        if self.options.prompt is not None and first is not None:
            assert self.tokens is not None
            prompt = self.tokens.prompt(first, self.options.prompt)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=outputs.usage(), prompt_logprobs=prompt)

    def _logprobs(self, entries: list[TokenLogprob] | None, count: int) -> ChatLogprobs | None:
        if self.options.logprobs is None:
            return None
        assert self.tokens is not None
        return ChatLogprobs(content=self.tokens.chat(_entries(entries, count), self.options.logprobs))


def _entries(entries: list[TokenLogprob] | None, count: int) -> list[TokenLogprob]:
    """The logprobs of `count` tokens, which the request asked for: their absence is a worker bug, not a 400."""
    if count and (entries is None or len(entries) != count):
        raise RuntimeError(f"logprobs were asked for, but the workers sent {len(entries or [])} for {count} tokens")
    return entries or []
