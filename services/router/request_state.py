"""What the router keeps about one output of a request while it runs (one per output: a request with n outputs
has n, each with its own id on the workers)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from ray import ObjectRef

from services.engine.sampling_params import SamplingParams
from services.engine.stats import RequestTimes, TransferStats
from services.engine.tokenizer import IncrementalDetokenizer
from services.router.admission import Deadline
from services.router.pool import WorkerHandle


def worker_ids(request_id: str, n: int) -> list[str]:
    """The ids a request's outputs run under on the workers: its own id, or `<id>-<index>` for each of n > 1."""
    return [request_id] if n == 1 else [f"{request_id}-{index}" for index in range(n)]


@dataclass
class RequestState:
    """One output's workers and progress. `prefill` is set from the prefill call until it returns, so that a
    cancellation in between aborts the request on the prefill worker too."""

    rid: str  # the id on the workers
    index: int
    ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    times: RequestTimes = dataclasses.field(default_factory=lambda: RequestTimes(arrival=time.monotonic()))
    decode: WorkerHandle | None = None
    prefill: WorkerHandle | None = None
    reserving: ObjectRef | None = None  # the decode worker's reserve() while it is in flight
    reserved: bool = False
    decoding: bool = False
    finished: bool = False
    transfer: TransferStats | None = None  # a successful hand-off, until it is observed with its transport
    transfer_failed: bool = False  # a failed KV hand-off was counted: one request counts once
    cached_tokens: int = 0
    # the decode worker prefilling it for a backlog of the prefill pool, and its tokens there, until the first batch
    local_backlog: tuple[WorkerHandle, int] | None = None
    last_emit: float | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)  # the tokens sent to the client
    migrations: int = 0  # times it moved off a dead decode worker (migration.py)
    left: list[str] = dataclasses.field(default_factory=list)  # the decode workers it moved off, by name
    deadline: Deadline = dataclasses.field(default_factory=Deadline)  # its request's (admission.py)
    prefills_left: list[str] = dataclasses.field(default_factory=list)  # prefill workers that died on it (reprefill.py)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def uncached_tokens(self) -> int:
        """The prompt tokens its reservation did not find in the decode worker's prefix cache."""
        return len(self.ids) - self.cached_tokens
