"""How a failed request is reported: the error its client gets, and the reason the metrics count it under.

Every error a client gets from the router is InvalidRequest, ResourceExhausted or Unavailable (the servers map
them to status codes). The Unavailable subclasses below only say why, for `failure_reason`; the reasons are
metric_specs.REQUEST_FAILURE_REASONS.
"""

from __future__ import annotations

import logging

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayError

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.router.errors import Unavailable
from services.transfer.errors import FAILURE_REASONS, TransferError
from services.worker.token_stream import TokenStreamLost

log = logging.getLogger(__name__)


class TransferFailed(Unavailable):
    """A KV hand-off failed under the "fail" policy."""


class WorkerFailed(Unavailable):
    """A worker died or failed while it ran the request."""


class InternalFailure(Unavailable):
    """An error the router did not expect (a bug): logged with its traceback."""


# Most specific first: the Unavailable subclasses before Unavailable.
_REASONS: list[tuple[type[BaseException], str]] = [
    (InvalidRequest, "invalid_request"),
    (ResourceExhausted, "resource_exhausted"),
    (TransferFailed, "transfer_failed"),
    (WorkerFailed, "worker_failed"),
    (InternalFailure, "internal"),
    (Unavailable, "unavailable"),
]


def unwrap(e: BaseException) -> BaseException:
    """The exception raised inside a worker, when Ray wrapped it."""
    cause = getattr(e, "cause", None) if isinstance(e, RayError) else None
    return cause if isinstance(cause, BaseException) else e


def is_worker_death(e: BaseException) -> bool:
    """Whether `e` says the worker process (or its node) is gone, rather than that the request was refused or
    failed in the worker's own code: what moves a request to another decode worker (migration.py)."""
    return isinstance(unwrap(e), (RayActorError, ObjectLostError, NodeDiedError, TokenStreamLost))


def is_worker_fault(e: BaseException) -> bool:
    """Whether `e` counts against the worker's circuit breaker: it died, or its engine failed the request."""
    return is_worker_death(e) or isinstance(unwrap(e), WorkerFailed)


def client_error(e: BaseException, rid: str) -> BaseException:
    """The error to give the client for `e`, raised while request `rid` ran: one line, no worker traceback."""
    cause = unwrap(e)
    if isinstance(cause, (InvalidRequest, ResourceExhausted, Unavailable)):
        return type(cause)(str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
    if isinstance(cause, TransferError):
        return TransferFailed(f"KV hand-off failed: {cause}")
    if isinstance(cause, (RayError, TokenStreamLost)):
        return WorkerFailed(f"a worker failed: {type(cause).__name__}")
    log.error("request %s failed", rid, exc_info=cause)
    return InternalFailure(f"internal error: {type(cause).__name__}: {cause}")


def failure_reason(e: BaseException) -> str:
    """The reason label of pdserve_request_failures_total for an error a client got."""
    return next((reason for kind, reason in _REASONS if isinstance(e, kind)), "internal")


def transfer_failure_reason(reason: str) -> str:
    """The reason label of pdserve_kv_transfer_failures_total for a TransferError reason (or a decode worker's
    report of one). A cancellation the router did not ask for means the other side went away: "peer_gone"."""
    return reason if reason in FAILURE_REASONS else "peer_gone"
