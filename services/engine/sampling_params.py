"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any

from services.engine.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy. top_k of -1 (or 0) and top_p of 1 disable those filters.
    max_tokens None means "up to the model's context". A seed makes the request's samples
    the same whatever else shares the batch.

    The rest follow vLLM's meaning. `n` samples that many outputs from one prompt (a seeded
    request's i-th output uses seed + i). Penalties: presence and frequency count output tokens,
    repetition counts prompt and output tokens (a value over 1 discourages repeats). min_p drops
    tokens less likely than min_p times the most likely one. Until min_tokens have been generated,
    EOS and stop_token_ids cannot be sampled. logit_bias adds to the logits of the token ids it
    names. logprobs asks for the sampled tokens' log-probabilities plus that many top alternatives
    (0: the sampled token's only); prompt_logprobs the same for each prompt token.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted from callers and stored as tuples so the params stay hashable and frozen;
        # a single stop string is one stop string, not a sequence of one-character ones.
        stop = (self.stop,) if isinstance(self.stop, str) else _as_tuple(self.stop)
        if stop is None or any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequest(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = _as_tuple(self.stop_token_ids)
        if ids is None or any(not _is_int(t) or t < 0 for t in ids):
            raise InvalidRequest(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1 (disabled) or >= 0, got {self.top_k!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in the int64 range, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        self._check_penalties_and_filters()
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequest(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    def _check_penalties_and_filters(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 2**16:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidRequest(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Whether sampling needs nothing beyond temperature, top-k and top-p (no penalty, bias, floor or logprobs)."""
        return (
            self.presence_penalty == 0 and self.frequency_penalty == 0 and self.repetition_penalty == 1
            and self.min_p == 0 and self.min_tokens == 0 and not self.logit_bias and self.logprobs is None
        )

    def for_sample(self, index: int) -> SamplingParams:
        """The params of the index-th of n outputs: one output each, seeds apart so the outputs differ.
        Only output 0 reports prompt logprobs (they are the same for all), so the others can take the
        prompt from the prefix cache instead of recomputing it."""
        seed = None if self.seed is None else (self.seed + index + 2**63) % 2**64 - 2**63
        return replace(self, n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Builds params from a JSON-like dict; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter(s): {', '.join(unknown)}")
        values = {k: v for k, v in data.items() if v is not None or k == "max_tokens"}
        try:
            return cls(**values)
        except TypeError as e:
            raise InvalidRequest(str(e)) from e


MAX_N = 128
MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI allows 20 top_logprobs
MAX_LOGIT_BIAS = 100.0


def _logit_bias(values: Any) -> tuple[tuple[int, float], ...]:
    """{token id: bias} (ids may be strings, as JSON keys are) or pairs, as sorted pairs; biases in [-100, 100]."""
    items = values.items() if isinstance(values, dict) else _as_tuple(values)
    if items is None:
        raise InvalidRequest(f"logit_bias must map token ids to numbers, got {values!r}")
    pairs: dict[int, float] = {}
    for item in items:
        try:
            key, bias = item
            token = int(key) if isinstance(key, str) else key
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias must map token ids to numbers, got {item!r}") from None
        if not _is_int(token) or token < 0:
            raise InvalidRequest(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
        if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bias!r} for token {key}")
        pairs[int(token)] = float(bias)
    return tuple(sorted(pairs.items()))


def _as_tuple(values: Any) -> tuple[Any, ...] | None:
    """A list-like (list, tuple, protobuf repeated field) as a tuple; None for anything else."""
    if isinstance(values, (str, bytes, dict)):
        return None
    try:
        return tuple(values)
    except TypeError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value  # rejects NaN
