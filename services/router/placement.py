"""Where a disagg request's prompt is prefilled (Router._reserve): on a prefill worker, or on its decode worker
when the part its prefix cache lacks is short (`local_prefill_threshold`), or when the prefill pool is backlogged
(`local_prefill_backlog_tokens`, as NVIDIA Dynamo's conditional disaggregation).

The backlogs are the router's own counts, on WorkerHandle.prefill_backlog: the uncached prompt tokens it has sent
each prefill worker and not yet seen prefilled (prefilling), and those it left to each decode worker for a
backlog, until the request's first batch or its end (prefilled_locally).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.router.config import RouterConfig
from services.router.pool import WorkerHandle
from services.router.request_state import RequestState


def place(config: RouterConfig, st: RequestState, decode: WorkerHandle, prefills: list[WorkerHandle]) -> str:
    """The decision, as pdserve_disagg_decisions_total counts it: "remote_prefill", "local_prefill" (short), or
    "local_prefill_backlog": every prefill worker has at least local_prefill_backlog_tokens still to prefill, and
    `decode` a shorter backlog, so the prompt waits less there, at the cost of a few longer steps for the decode
    worker's other requests."""
    uncached = st.uncached_tokens
    if uncached < config.local_prefill_threshold:
        return "local_prefill"
    limit = config.local_prefill_backlog_tokens
    shortest = min((w.prefill_backlog for w in prefills if w.routable), default=0)
    if limit and shortest >= limit and decode.prefill_backlog < shortest:
        st.local_backlog = (decode, uncached)
        decode.prefill_backlog += uncached
        return "local_prefill_backlog"
    return "remote_prefill"


def prefilled_locally(st: RequestState) -> None:
    """Takes the prompt of a request left to its decode worker for a backlog off that worker's backlog (once)."""
    if st.local_backlog is not None:
        worker, tokens = st.local_backlog
        worker.prefill_backlog -= tokens
        st.local_backlog = None


@contextmanager
def prefilling(worker: WorkerHandle, st: RequestState) -> Iterator[None]:
    """Counts the request's uncached prompt tokens in the prefill worker's backlog while the block runs (its call)."""
    tokens = st.uncached_tokens
    worker.prefill_backlog += tokens
    try:
        yield
    finally:
        worker.prefill_backlog -= tokens
