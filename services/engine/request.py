"""A request and its explicit state machine. Pure Python."""

from __future__ import annotations

import enum
import time

from services.engine.logprobs import PromptLogprobs
from services.engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    WAITING_FOR_REMOTE_KV = enum.auto()  # decode side: blocks reserved, KV arriving from a prefill worker
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Finished states stay last so `is_finished` is one comparison.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}

_ALLOWED = {
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.WAITING_FOR_REMOTE_KV},
    RequestStatus.WAITING_FOR_REMOTE_KV: {RequestStatus.RUNNING},
    RequestStatus.RUNNING: {RequestStatus.PREEMPTED},
    RequestStatus.PREEMPTED: {RequestStatus.RUNNING},
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 until then
        self.num_preemptions = 0
        self.max_tokens = sampling_params.max_tokens or 0
        # Filled chunk by chunk while the prompt is computed (entry i is prompt token i's; the first is
        # None), then handed out with the first output and dropped: None when not asked for or sent.
        self.prompt_logprobs: PromptLogprobs | None = None if sampling_params.prompt_logprobs is None else [None]

    def transition(self, status: RequestStatus) -> None:
        """The one place a request changes state. Any state may finish; others follow _ALLOWED."""
        if not status.is_finished and status not in _ALLOWED.get(self.status, set()):
            raise AssertionError(f"request {self.request_id}: illegal transition {self.status.name} -> {status.name}")
        if status == RequestStatus.PREEMPTED:
            self.num_computed_tokens = 0
            self.num_preemptions += 1
        self.status = status

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def sort_key(self) -> tuple[int, float]:
        """Lower priority value first, then first come first served."""
        return (self.priority, self.arrival_time)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished state the newest token puts the request in, if any."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        params = self.sampling_params
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
