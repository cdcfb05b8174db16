"""What every benchmark target client (gRPC, OpenAI HTTP) is and returns: the Target contract, the model
description it reports, and the timed Outcome of one request.

A leaf module: the clients import it, and so does the factory in target.py that imports the clients.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from services.bench.prompt import BenchRequest, Reply


@dataclass(frozen=True)
class TargetInfo:
    """What the server says about its model; fields it does not report are None."""

    model: str
    vocab_size: int | None = None
    max_model_len: int | None = None
    eos_token_id: int | None = None


@dataclass
class Outcome:
    """One request as a client saw it. Times are seconds; `start` is a time.perf_counter() reading."""

    start: float
    success: bool = False
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    reply: Reply | None = None
    error: str | None = None


class StreamTimer:
    """Stamps token-bearing chunks of one stream: the first gives TTFT, the gaps between them ITL."""

    def __init__(self) -> None:
        self.outcome = Outcome(start=time.perf_counter())
        self._last: float | None = None

    def chunk(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.outcome.ttft_s = now - self.outcome.start
        else:
            self.outcome.itl_s.append(now - self._last)
        self._last = now

    @property
    def seen_tokens(self) -> bool:
        return self._last is not None

    def succeed(self, prompt_tokens: int, output_tokens: int, reply: Reply) -> Outcome:
        o = self.outcome
        o.e2e_s = time.perf_counter() - o.start
        if o.ttft_s is None:  # a reply with no token-bearing chunk: its first byte is its end
            o.ttft_s = o.e2e_s
        o.success, o.prompt_tokens, o.output_tokens, o.reply = True, prompt_tokens, output_tokens, reply
        return o

    def fail(self, error: str) -> Outcome:
        self.outcome.e2e_s = time.perf_counter() - self.outcome.start
        self.outcome.error = error
        return self.outcome


class Target(ABC):
    """A server that generates. `open()` before use, `close()` after; `generate` never raises for a
    request that fails on the server: it returns an unsuccessful Outcome with the error."""

    url: str

    @abstractmethod
    async def open(self) -> TargetInfo:
        """Connects and returns the model's description; raises ConnectionError when the server is not there."""

    @abstractmethod
    async def generate(self, request: BenchRequest, temperature: float) -> Outcome:
        """Streams one request to the end, timing each chunk."""

    @abstractmethod
    async def close(self) -> None: ...
