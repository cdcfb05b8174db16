"""Building OpenAI responses from the router's events: a request's n outputs collected, and the whole bodies and
stream chunks of /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.router.messages import Chunk, Completion, Event
from services.router.openai_logprobs import TokenText
from services.router.openai_responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionResponseChoice,
    Usage,
    now,
)

# ---- collecting outputs ----------------------------------------------------------------------------------


@dataclass
class Output:
    """One of a request's n outputs, as the router's events built it."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Completion | None = None


class Outputs:
    """The n outputs of one request, filled from the router's interleaved events. The prompt's logprobs come
    once, with output 0's first chunk (SamplingParams.for_sample), and serve every output."""

    def __init__(self, n: int) -> None:
        self.items = [Output(i) for i in range(n)]
        self.prompt_logprobs: PromptLogprobs | None = None

    def add(self, event: Event) -> Output:
        out = self.items[event.index]
        if isinstance(event, Chunk):
            out.text += event.text
            out.token_ids += event.token_ids
            out.logprobs += event.logprobs or []
            self.prompt_logprobs = self.prompt_logprobs or event.prompt_logprobs
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
        self._prompt_logprobs: PromptLogprobs | None = None  # from output 0's first chunk, for every output

    def opening(self) -> list[BaseModel]:
        return []

    def chunk(self, event: Chunk) -> BaseModel | None:
        """The stream chunk for new tokens of one output; None when it would carry nothing."""
        self._prompt_logprobs = self._prompt_logprobs or event.prompt_logprobs
        out = Output(event.index, event.text, event.token_ids, event.logprobs or [])
        text, logprobs = self._choice_parts(out, self._prompt_logprobs, first=not self._started[event.index])
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
            text, logprobs = self._choice_parts(out, outputs.prompt_logprobs, first=True)
            prompt = None
            if self.options.prompt is not None and outputs.prompt_logprobs is not None:
                assert self.tokens is not None
                prompt = self.tokens.prompt(outputs.prompt_logprobs, self.options.prompt)
            choices.append(CompletionResponseChoice(index=out.index, text=text, logprobs=logprobs,
                                                    finish_reason=out.done.finish_reason, prompt_logprobs=prompt))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=outputs.usage())

    def _chunk(self, choice: CompletionChoice) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _choice_parts(self, out: Output, prompt_logprobs: PromptLogprobs | None,
                      first: bool) -> tuple[str, CompletionLogprobs | None]:
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
            if prompt_logprobs is None:
                raise RuntimeError("echo with logprobs, but the workers sent no prompt logprobs")
            ids, entries = opts.prompt_ids + ids, [*prompt_logprobs, *entries]
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
        if self.options.prompt is not None and outputs.prompt_logprobs is not None:
            assert self.tokens is not None
            prompt = self.tokens.prompt(outputs.prompt_logprobs, self.options.prompt)
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
