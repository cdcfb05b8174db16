"""Dispatch policies: a small ABC and a registry. Pure Python."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from services.engine.block_manager import prefix_block_hashes


class Candidate(Protocol):
    """What a policy may read of a worker."""

    @property
    def name(self) -> str: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def queued_prefill_tokens(self) -> int: ...
    @property
    def inflight(self) -> int: ...


W = TypeVar("W", bound=Candidate)


@dataclass
class RoutingRequest:
    prompt_token_ids: list[int]
    block_size: int
    _hashes: list[int] | None = field(default=None, repr=False)

    @property
    def block_hashes(self) -> list[int]:
        if self._hashes is None:
            self._hashes = prefix_block_hashes(self.prompt_token_ids, self.block_size)
        return self._hashes


class Policy(ABC):
    @abstractmethod
    def choose(self, workers: list[W], request: RoutingRequest) -> W:
        """Picks one of `workers` (never empty) for the request."""

    def record(self, worker: Candidate, request: RoutingRequest) -> None:  # noqa: B027 - optional hook
        """Told which worker got the request (policies with memory use it)."""


class RoundRobin(Policy):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, workers: list[W], request: RoutingRequest) -> W:
        return workers[next(self._counter) % len(workers)]


class LeastLoaded(Policy):
    """Fewest queued prefill tokens and requests in flight; most free KV blocks breaks ties."""

    def choose(self, workers: list[W], request: RoutingRequest) -> W:
        return min(workers, key=lambda w: (w.queued_prefill_tokens + 64 * w.inflight, -w.free_blocks))


class PrefixAffinity(Policy):
    """Sends a prompt where its longest prefix was last sent, unless that worker is much busier.

    Remembers up to `capacity` block hashes per worker (LRU), the router's view of each
    worker's prefix cache.
    """

    def __init__(self, capacity: int = 50_000, max_imbalance_tokens: int = 4096) -> None:
        self.capacity = capacity
        self.max_imbalance_tokens = max_imbalance_tokens
        self.seen: dict[str, OrderedDict[int, None]] = {}
        self.fallback = LeastLoaded()

    def _match(self, worker: Candidate, hashes: list[int]) -> int:
        seen = self.seen.get(worker.name)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def choose(self, workers: list[W], request: RoutingRequest) -> W:
        least = self.fallback.choose(workers, request)
        hashes = request.block_hashes
        best = max(workers, key=lambda w: self._match(w, hashes))
        if self._match(best, hashes) == 0:
            return least
        load = lambda w: w.queued_prefill_tokens + 64 * w.inflight  # noqa: E731
        return best if load(best) - load(least) <= self.max_imbalance_tokens else least

    def record(self, worker: Candidate, request: RoutingRequest) -> None:
        seen = self.seen.setdefault(worker.name, OrderedDict())
        for h in request.block_hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "prefix_affinity": PrefixAffinity,
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
