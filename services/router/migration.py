"""Migration by token replay: an output whose decode worker dies mid-stream moves to another decode worker.

    client ◄── t0 t1 t2 ─────────── (worker A dies) ─────────── t3 t4 ... ◄── worker B
                         B.generate(prompt, local, generated=[t0 t1 t2]) ──┘

The new worker prefills the prompt and the tokens the client already has, as the engine resumes a preempted
request: those tokens count as generated, not as prompt, so max_tokens, min_tokens, the penalties and the stop
conditions carry on as though nothing happened, and only the tokens after them come back. The router's
detokenizer and stop strings carry on across the move, so the client sees one stream with no token twice and
none missing. Greedy output is exactly the un-failed output, and so is seeded sampling: each draw's generator
is seeded from (seed, tokens generated so far) (sampler.generator_seed), not from a state that lived on the
dead worker. Unseeded sampling carries on with fresh randomness, another sample of the same distribution (vLLM
and Dynamo migrate the same way). Prompt logprobs already went with the first token and are not sent again.

What moves: an output whose call to its decode worker failed because the worker is gone (a Ray actor error:
the process was killed, or its node lost; or its token stream ended before the finished batch), whether it was
streaming, waiting for KV or still reserving. An
output refused (InvalidRequest, ResourceExhausted), failed by the engine, or failed by a KV hand-off under the
"fail" policy does not. It moves at most --migration-limit times; past that, or with no other decode worker
taking requests, the client gets the error as before (UNAVAILABLE, "a worker failed: ...").

The dead worker is not told: a restarted actor starts empty, and one only cut off from the router ends the
request when its token stream's connection ends (at once, or when TCP keepalive gives up on a silent router),
freeing its blocks as any aborted request does. Aborting it by id later could instead
hit a new request that reuses the id there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from services.router.config import RouterConfig
from services.router.failures import is_worker_death, is_worker_fault
from services.router.metrics import Metrics
from services.router.policies import Policy, RoutingRequest
from services.router.pool import WorkerHandle
from services.router.request_state import RequestState

log = logging.getLogger(__name__)


class Pools(Protocol):
    """What a migration reads of the pools (WorkerPools): the decode workers as they are now."""

    @property
    def decode(self) -> list[WorkerHandle]: ...


class Migrations:
    """Decides whether and where a failed output moves; the router then streams it from there."""

    def __init__(self, config: RouterConfig, metrics: Metrics, policy: Policy, block_size: int) -> None:
        self.limit = config.migration_limit
        self.breaker_threshold = config.circuit_breaker_failures
        self.metrics = metrics
        self.policy = policy
        self.block_size = block_size

    async def resume(self, st: RequestState, error: BaseException, pools: Pools,
                     stream: Callable[[WorkerHandle], Awaitable[None]]) -> None:
        """After `error`, moves `st` to another decode worker and streams it from there (`stream`, a local
        request with the tokens sent so far as generated), as often as it may; else raises the last error."""
        while (target := self.target(st, error, pools.decode)) is not None:
            try:
                await stream(target)
                return
            except Exception as e:  # noqa: BLE001 - the next worker may die too
                error = e
        raise error

    def target(self, st: RequestState, error: BaseException, workers: list[WorkerHandle]) -> WorkerHandle | None:
        """The decode worker `st` moves to after `error`, with `st` moved there (st.decode, in-flight counts,
        the migration counted); None when it does not move and `error` stands."""
        old = st.decode
        if old is None:  # it failed before any decode worker was chosen
            return None
        if is_worker_fault(error):
            old.record_failure(self.breaker_threshold)
        if not is_worker_death(error) or st.finished:
            return None
        if st.migrations >= self.limit:
            log.warning("request %s: decode worker %s died; not moved: the migration limit (%d) is reached",
                        st.rid, old.name, self.limit)
            return None
        st.left.append(old.name)
        candidates = [w for w in workers if w.routable and w.name not in st.left]
        if not candidates:
            log.warning("request %s: decode worker %s died; not moved: no other decode worker takes requests",
                        st.rid, old.name)
            return None
        routing = RoutingRequest(st.ids + st.output_ids, self.block_size)
        new = self.policy.choose(candidates, routing)
        self.policy.record(new, routing)
        old.inflight -= 1
        new.inflight += 1
        st.decode, st.reserving, st.reserved, st.decoding = new, None, False, False
        st.migrations += 1
        st.times.dispatched = st.times.dispatched or time.monotonic()  # it died while reserving: dispatched now
        self.metrics.observe_migration()
        log.warning("request %s: decode worker %s died (%s) after %d tokens; moved to %s by token replay "
                    "(migration %d of at most %d)", st.rid, old.name, type(error).__name__, len(st.output_ids),
                    new.name, st.migrations, self.limit)
        return new
