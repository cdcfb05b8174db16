"""Admission control and deadlines: which requests the router takes on now, which wait, which it refuses.

A request holds, from admission to its end, the worst case of the KV it can fill on a decode worker:
its prompt plus n × max_tokens (max_tokens unset: the rest of the context), `kv_need`. The router admits
against the decode pool's KV, the blocks of its routable workers × --kv-overcommit:

    Router.generate ─► Admission.admit(ticket: need, deadline)
        nobody waits before it, and it fits (or nothing else is admitted) ─► admitted: dispatched now
        else, fewer than --max-queued-requests wait ─► waits in the router, first come first served,
                                                       until admitted requests end (or the deadline)
        else ─► Overloaded, at once: HTTP 429 + Retry-After / gRPC RESOURCE_EXHAUSTED
    A request that would wait refuses the same way, at once, when the queue ahead of it would outlast its
    deadline: the queue's length times the time between admitted requests' ends, while requests wait.

A request that waits holds nothing on any worker, so the admitted ones keep their time to first token.
A decode pool with no routable worker (or --kv-overcommit 0) sets no KV limit: the request goes on and
the dispatch answers UNAVAILABLE. Each router replica keeps its own account, so replicas that share
pools admit up to the pool's KV each.

Deadlines: every request has at most one, the shortest of the client's (the gRPC deadline, HTTP's
X-Request-Timeout header) and --request-timeout-s. Waiting here counts against it. When it passes, the
router cancels the request's outputs, which frees their KV on both sides, and raises DeadlineExceeded
(gRPC DEADLINE_EXCEEDED, HTTP 504, or an error object in a stream that has started).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.engine.sampling_params import SamplingParams
from services.router.config import RouterConfig
from services.router.metrics import Metrics

if TYPE_CHECKING:
    from services.router.pool import WorkerHandle

_T = TypeVar("_T")

REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
# A waiting request re-reads the pool's capacity this often: workers come, go and restart between releases.
RECHECK_S = 0.5


class Overloaded(ResourceExhausted):
    """Refused at admission: the router's queue is full (HTTP 429 / RESOURCE_EXHAUSTED)."""


class Aborted(Exception):
    """The request was aborted (Router.abort) while it waited for admission."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed (gRPC DEADLINE_EXCEEDED / HTTP 504)."""


@dataclass(frozen=True)
class AdmissionLimits:
    max_queued_requests: int  # requests that may wait for admission; -1: no limit
    kv_overcommit: float  # admit up to this × the decode pool's KV; 0: no KV limit


class Load(NamedTuple):
    """The admission account: requests admitted and not yet ended, their KV need, and the requests waiting."""

    admitted: int
    kv_tokens: int
    queued: int


class Verdict(Enum):
    ADMIT = "admit"
    QUEUE = "queue"
    REJECT = "reject"


def kv_need(prompt_tokens: int, params: SamplingParams, max_model_len: int) -> int:
    """The most KV tokens the request can fill: its prompt once (the outputs share its prefix), plus each output."""
    output = params.max_tokens if params.max_tokens is not None else max(max_model_len - prompt_tokens, 1)
    return prompt_tokens + params.n * output


def kv_capacity(decode_workers: Iterable[WorkerHandle]) -> int:
    """KV tokens of the decode workers the router may send requests to (0 when none is known)."""
    return sum(w.info.num_blocks * w.info.block_size for w in decode_workers if w.routable and w.info is not None)


def capacity_tokens(raw_tokens: int, limits: AdmissionLimits) -> int | None:
    """The KV tokens the router admits against; None: no KV limit."""
    if raw_tokens <= 0 or limits.kv_overcommit == 0:
        return None
    return int(raw_tokens * limits.kv_overcommit)


def fits(load: Load, need: int, capacity: int | None) -> bool:
    """Whether a request of `need` tokens may run beside the admitted ones. A request alone always may:
    the engine's KV holds max_model_len tokens, and its scheduler preempts if a larger n needs more."""
    return capacity is None or load.admitted == 0 or load.kv_tokens + need <= capacity


def decide(load: Load, need: int, capacity: int | None, limits: AdmissionLimits) -> Verdict:
    """Admit now only when nobody waits (first come, first served); else wait while the queue has room."""
    if load.queued == 0 and fits(load, need, capacity):
        return Verdict.ADMIT
    if limits.max_queued_requests < 0 or load.queued < limits.max_queued_requests:
        return Verdict.QUEUE
    return Verdict.REJECT


def parse_timeout(value: str | None) -> float | None:
    """The seconds of an X-Request-Timeout header (None when absent); InvalidRequest unless a positive number."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise InvalidRequest(f"{REQUEST_TIMEOUT_HEADER} must be a positive number of seconds, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Deadline:
    """When a request must be over: `at` in time.monotonic() seconds, None for never."""

    timeout_s: float | None = None
    at: float | None = None

    @classmethod
    def within(cls, *timeouts_s: float | None) -> Deadline:
        """The deadline of the shortest of the given timeouts from now (None ones are no limit)."""
        given = [t for t in timeouts_s if t is not None]
        if not given:
            return cls()
        timeout = min(given)
        return cls(timeout, time.monotonic() + timeout)

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def exceeded(self, what: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request's deadline of {self.timeout_s:g} s passed {what}")


@dataclass(eq=False)
class Ticket:
    """One request's place in the admission account: its KV need and its deadline."""

    need: int
    deadline: Deadline
    admitted: bool = False
    aborted: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Admission:
    """The router's admission account over its decode pool (see the module docstring), with the limits and the
    default deadline of `config`. `capacity` reads the pool's raw KV tokens (kv_capacity); rejections and
    deadlines are counted in `metrics`."""

    def __init__(self, config: RouterConfig, capacity: Callable[[], int], metrics: Metrics) -> None:
        self.limits = AdmissionLimits(config.max_queued_requests, config.kv_overcommit)
        self.capacity = capacity
        self.metrics = metrics
        self.default_timeout_s = config.request_timeout_s
        self.admitted = 0
        self.kv_tokens = 0
        self.waiting: deque[Ticket] = deque()
        # Seconds between two ends of admitted requests while others waited (a moving average), and the last end.
        self.end_interval: float | None = None
        self._last_end: float | None = None

    @property
    def load(self) -> Load:
        return Load(self.admitted, self.kv_tokens, len(self.waiting))

    def ticket(self, need: int, timeout_s: float | None) -> Ticket:
        """A request's ticket, not yet admitted. Its deadline, from now, is the client's `timeout_s` or the
        server's default, whichever is shorter."""
        return Ticket(need, Deadline.within(timeout_s, self.default_timeout_s))

    async def admit(self, ticket: Ticket) -> None:
        """Returns once the request may run; raises Overloaded at once when the queue is full, DeadlineExceeded
        when the deadline passes while it waits. Give the ticket back with release() in any case."""
        capacity = capacity_tokens(self.capacity(), self.limits)
        verdict = decide(self.load, ticket.need, capacity, self.limits)
        if verdict is Verdict.REJECT:
            self.metrics.observe_failure("resource_exhausted")
            raise Overloaded(
                f"the server is overloaded: {len(self.waiting)} requests already wait for room in the decode "
                f"pool's KV cache (the most that may, --max-queued-requests); retry later")
        if verdict is Verdict.ADMIT:
            self._take(ticket)
        else:
            self._refuse_if_too_late(ticket)
            self.waiting.append(ticket)
        self._publish(capacity)
        try:
            while not ticket.admitted:
                if ticket.aborted:
                    raise Aborted()
                await self._wait(ticket)
        except BaseException:  # the deadline, or a cancellation: perhaps just as the ticket was admitted
            if ticket.admitted:
                self.release(ticket)
            else:
                self.waiting.remove(ticket)
                self._wake()
            raise

    def _refuse_if_too_late(self, ticket: Ticket) -> None:
        """Overloaded when the queue ahead would outlast the request's deadline: better at once than at its end."""
        remaining = ticket.deadline.remaining()
        if remaining is None or self.end_interval is None:
            return
        expected = (len(self.waiting) + 1) * self.end_interval
        if expected > remaining:
            self.metrics.observe_failure("resource_exhausted")
            raise Overloaded(
                f"the server is overloaded: the {len(self.waiting)} requests waiting ahead would take about "
                f"{expected:.1f} s, past this request's deadline ({remaining:.1f} s left); retry later")

    async def _wait(self, ticket: Ticket) -> None:
        remaining = ticket.deadline.remaining()
        if remaining is not None and remaining <= 0:
            self.metrics.observe_deadline_exceeded("admission")
            raise ticket.deadline.exceeded("while it waited for admission")
        try:
            async with asyncio.timeout(RECHECK_S if remaining is None else min(RECHECK_S, remaining)):
                await ticket.ready.wait()
        except TimeoutError:
            self._wake()  # the pool's capacity may have changed

    def abort(self, ticket: Ticket) -> bool:
        """Marks the ticket aborted, and ends its wait if it is not yet admitted (its admit() raises Aborted):
        True then, False when it was admitted (its request is running)."""
        ticket.aborted = True
        if ticket.admitted:
            return False
        ticket.ready.set()
        return True

    def release(self, ticket: Ticket) -> None:
        """The request has ended and its KV is freed: its share goes to those waiting (a no-op unless admitted)."""
        if not ticket.admitted:
            return
        ticket.admitted = False
        self.admitted -= 1
        self.kv_tokens -= ticket.need
        self._time_end()
        self._wake()

    def _time_end(self) -> None:
        """Times the ends of admitted requests while others wait: how fast the queue moves."""
        now = time.monotonic()
        if self.waiting and self._last_end is not None:
            gap = now - self._last_end
            self.end_interval = gap if self.end_interval is None else 0.8 * self.end_interval + 0.2 * gap
        self._last_end = now if self.waiting else None

    async def until(self, ticket: Ticket, step: Awaitable[_T]) -> _T:
        """Awaits one step of an admitted request, raising DeadlineExceeded when its deadline passes first."""
        deadline = ticket.deadline
        if deadline.at is None:
            return await step
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline.at - time.monotonic()):
                return await step
        except TimeoutError:
            self.metrics.observe_deadline_exceeded("running")
            raise deadline.exceeded("while it ran") from None

    def _take(self, ticket: Ticket) -> None:
        ticket.admitted = True
        ticket.ready.set()
        self.admitted += 1
        self.kv_tokens += ticket.need

    def _wake(self) -> None:
        """Admits those waiting at the head of the queue, in order, while they fit."""
        capacity = capacity_tokens(self.capacity(), self.limits)
        while self.waiting and fits(self.load, self.waiting[0].need, capacity):
            self._take(self.waiting.popleft())
        self._publish(capacity)

    def _publish(self, capacity: int | None) -> None:
        self.metrics.set_admission(self.admitted, self.kv_tokens, len(self.waiting), capacity or 0)
