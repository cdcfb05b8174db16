"""Drives a target: Poisson (open-loop) arrivals of conversations at a rate, optionally capped at a number of
requests in flight (closed loop when the rate is infinite), each conversation's turns sent one after another.

  time ──►  conv 0: |turn0──────|turn1────|        arrivals: exponential gaps at --request-rate
            conv 1:     |turn0──────|turn1───|     in flight: at most --max-concurrency requests
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from services.bench.datasets import Conversation, num_requests
from services.bench.metrics import RequestRecord
from services.bench.prompt import Reply, build_request
from services.bench.target_base import Target


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf  # conversation arrivals per second; inf sends them all at once
    max_concurrency: int | None = None
    seed: int = 0
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"the request rate must be positive (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be at least 1, got {self.max_concurrency}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class RunResult:
    config: LoadConfig
    duration_s: float
    records: list[RequestRecord]
    # A pdserve target's per-token path: each stage's median seconds per token (services/bench/token_stages.py)
    token_stages: dict[str, float | None] = field(default_factory=dict)


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Offsets in seconds of `n` Poisson arrivals at `rate` per second, the first at 0; all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def parse_rates(spec: str) -> list[float]:
    """"1,2.5,inf" -> [1.0, 2.5, inf]."""
    rates: list[float] = []
    for part in spec.split(","):
        try:
            rate = float(part.strip())
        except ValueError:
            raise ValueError(f"bad request rate {part!r} in {spec!r}: expected numbers or inf") from None
        if not rate > 0:
            raise ValueError(f"request rates must be positive (or inf), got {part!r}")
        rates.append(rate)
    return rates


class _Run:
    def __init__(self, target: Target, config: LoadConfig, bar: tqdm) -> None:
        self.target = target
        self.config = config
        self.bar = bar
        self.sem = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        self.records: list[RequestRecord] = []
        self.t0 = 0.0

    async def conversation(self, index: int, first: int, conversation: Conversation, at: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + at - time.perf_counter()))
        replies: list[Reply] = []
        for turn in range(len(conversation.turns)):
            scheduled = time.perf_counter() - self.t0
            expected = conversation.turns[turn].output_len
            if len(replies) < turn:  # an earlier turn failed: the rest of the conversation cannot be sent
                self._add(RequestRecord(first + turn, index, turn, scheduled, scheduled, False,
                                        expected_output_tokens=expected, error="skipped: an earlier turn failed"))
                continue
            request = build_request(conversation, turn, replies)
            if self.sem is not None:
                async with self.sem:
                    outcome = await self.target.generate(request, self.config.temperature)
            else:
                outcome = await self.target.generate(request, self.config.temperature)
            self._add(RequestRecord(
                first + turn, index, turn, scheduled, outcome.start - self.t0, outcome.success,
                outcome.prompt_tokens, outcome.output_tokens, expected, outcome.ttft_s, outcome.e2e_s,
                outcome.itl_s, outcome.error,
            ))
            if outcome.success and outcome.reply is not None:
                replies.append(outcome.reply)

    def _add(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.bar.update(1)


async def run_load(target: Target, conversations: list[Conversation], config: LoadConfig,
                   progress: bool = True, label: str = "") -> RunResult:
    """Sends every conversation; returns one record per turn, in request order, and the run's wall time."""
    arrivals = arrival_times(len(conversations), config.request_rate, config.seed)
    with tqdm(total=num_requests(conversations), file=sys.stderr, disable=not progress, desc=label,
              unit="req", dynamic_ncols=True) as bar:
        run = _Run(target, config, bar)
        run.t0 = time.perf_counter()
        firsts, n = [], 0
        for c in conversations:
            firsts.append(n)
            n += len(c.turns)
        await asyncio.gather(*(run.conversation(i, firsts[i], c, arrivals[i]) for i, c in enumerate(conversations)))
        duration = time.perf_counter() - run.t0
    return RunResult(config, duration, sorted(run.records, key=lambda r: r.index))
