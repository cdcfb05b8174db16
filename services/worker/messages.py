"""Messages that cross the process boundary between the router and the worker actors.

They carry token ids and small metadata only; KV never travels in them (it goes over UCX).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.engine.stats import WorkerStats


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    role: str  # "prefill" | "decode" | "colocated"
    kv_address: str | None  # decode side: where its KV receiver listens
    block_size: int
    num_blocks: int
    # decode and colocated: where its token streams are served, and the secret a router shows there
    # (services/worker/token_stream.py)
    token_address: str | None = None
    token_secret: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Reservation:
    """Blocks a decode worker holds for a request until its KV arrives or the lease runs out."""

    request_id: str
    cached_tokens: int  # leading prompt tokens the decode worker's prefix cache already has
    lease_s: float


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    finish_reason: str | None  # set when the first token already ends the request
    cached_tokens: int  # prefill-side prefix-cache hit
    transfer_wait_s: float  # after the first token, waiting for the last KV bytes to be sent
    bytes_sent: int
    first_logprob: TokenLogprob | None = None  # when the request asked for logprobs
    prompt_logprobs: PromptLogprobs | None = None  # when it asked for prompt logprobs


@dataclass(frozen=True)
class TokenBatch:
    """Tokens a worker produced for one request since its last batch."""

    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    # decode side: when the request joined the running batch (time.time()); set on the first batch only
    decode_start: float | None = None
    # decode side, first batch only: why the hand-off failed when the prompt was recomputed here instead
    kv_failure: str | None = None
    # decode side, first batch only: what the prompt's KV crossed from the prefill worker ("shm" on one host,
    # else UCX's transports: "tcp", "rc_mlx5", ...; see services.transfer.KVArrival); None when none arrived
    kv_transport: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs
    prompt_logprobs: PromptLogprobs | None = None  # on the batch after a prompt computed here, when asked for
    # The per-token path (the router's pdserve_token_stage_seconds): the engine steps that made these tokens,
    # in seconds all told, and when they ended, on average (time.time()).
    step_seconds: float = 0.0
    produced_at: float = 0.0


@dataclass(frozen=True)
class LoadInfo:
    stats: WorkerStats
    num_used_blocks: int
    num_reservations: int
    integrity_error: str | None  # None when the check passed or was not asked for
    pid: int
    node_ip: str = ""  # its Ray node's address: with pid, which process on which host
