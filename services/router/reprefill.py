"""Re-prefill: an output whose prefill worker dies before its first token is prefilled again on another one.

    decode worker D: reserve ─► prefill worker P1 computes, streams KV ──(P1 dies)
                     abort, reserve again ─► prefill worker P2 computes, streams KV ─► first token ─► D decodes

What moves: an output whose call to its prefill worker failed because the worker is gone (a Ray actor error:
the process was killed, or its node lost), while no token has reached the client, its deadline has time left,
and a prefill worker it has not tried takes requests. This is the ordinary path again on a live worker, not a
fallback, so it happens under either failure policy. The decode worker's reservation, whose blocks the dead
worker may have half filled and whose expectation failed with its connection, is given back and made again:
the new worker streams into a reservation of its own.

Otherwise the failure stands as before: under "recompute" the decode worker prefills the prompt itself, under
"fail" the client gets UNAVAILABLE.
"""

from __future__ import annotations

import logging

from services.router.metrics import Metrics
from services.router.policies import Policy, RoutingRequest
from services.router.pool import WorkerHandle
from services.router.request_state import RequestState

log = logging.getLogger(__name__)


class PrefillDied(Exception):
    """The prefill worker of an output died while it prefilled it."""

    def __init__(self, worker: WorkerHandle, error: BaseException) -> None:
        super().__init__(f"prefill worker {worker.name} failed: {type(error).__name__}")
        self.worker = worker


class Reprefills:
    """Decides whether and where an output whose prefill worker died is prefilled again."""

    def __init__(self, metrics: Metrics, policy: Policy) -> None:
        self.metrics = metrics
        self.policy = policy

    def target(self, st: RequestState, died: PrefillDied, workers: list[WorkerHandle],
               routing: RoutingRequest) -> WorkerHandle | None:
        """The prefill worker that prefills `st` again, chosen and counted; None when it is not prefilled again."""
        st.prefills_left.append(died.worker.name)
        remaining = st.deadline.remaining()
        if st.output_ids or st.finished or (remaining is not None and remaining <= 0):
            return None
        candidates = [w for w in workers if w.routable and w.name not in st.prefills_left]
        if not candidates:
            log.warning("request %s: %s; not prefilled again: no other prefill worker takes requests", st.rid, died)
            return None
        new = self.policy.choose(candidates, routing)
        self.policy.record(new, routing)
        self.metrics.observe_reprefill()
        log.warning("request %s: %s before its first token; prefilled again on %s (%s)", st.rid, died, new.name,
                    "no deadline" if remaining is None else f"{remaining:.1f} s left of its deadline")
        return new


async def reserve_again(st: RequestState, lease_s: float) -> None:
    """Gives back the output's reservation on its decode worker and makes a new one, for a new prefill worker."""
    decode = st.decode
    assert decode is not None
    await decode.actor.abort.remote(st.rid)
    st.reserved = False
    st.reserving = decode.actor.reserve.remote(st.rid, st.ids, st.params, lease_s)
    reservation = await st.reserving
    st.reserving, st.reserved = None, True
    st.cached_tokens = reservation.cached_tokens
