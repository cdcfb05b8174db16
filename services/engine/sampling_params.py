"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from services.engine.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy. top_k of -1 (or 0) and top_p of 1 disable those filters.
    max_tokens None means "up to the model's context". A seed makes the request's samples
    the same whatever else shares the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

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
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise InvalidRequest(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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
