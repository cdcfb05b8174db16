"""What goes into Router.generate (GenerateInput) and what comes out of it (Chunk and Completion events), shared
by the gRPC and HTTP front ends."""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.logprobs import PromptLogprobs, TokenLogprob
from services.engine.sampling_params import SamplingParams


@dataclass
class GenerateInput:
    request_id: str = ""
    text: str | None = None
    token_ids: list[int] | None = None
    params: SamplingParams | None = None
    priority: int = 0
    owner: str | None = None  # who may abort it (the gRPC caller's identity); None: nobody, by id


@dataclass
class Chunk:
    """New tokens of one output (`index`, 0 to n-1) and the text they complete."""

    token_ids: list[int]
    text: str
    index: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs
    prompt_logprobs: PromptLogprobs | None = None  # on an output's first chunk, when asked for
    emitted_at: float = 0.0  # time.monotonic() when the router queued it for the client


@dataclass
class Completion:
    """The end of one output (`index`); a request with n outputs ends after n of these."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    index: int = 0


Event = Chunk | Completion


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation: its id, prompt tokens and sampling parameters."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
