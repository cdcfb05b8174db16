"""Logprobs in the OpenAI wire formats: the legacy completions object, chat's per-token entries, and vLLM's
prompt_logprobs, each token shown as its own text."""

from __future__ import annotations

from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.engine.tokenizer import Tokenizer
from services.router.openai_responses import (
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobsOut,
    TopLogprob,
)

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
