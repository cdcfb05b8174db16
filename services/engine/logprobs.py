"""Log-probabilities reported for tokens: sampled ones, and (on request) the prompt's. Pure Python.

Values are the model's raw distribution, log_softmax of its logits, before temperature, penalties
or any filter, as vLLM reports by default, so they compare directly with a transformers forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token with its log-probability, its rank (1 = most likely) and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


# A prompt's log-probabilities: one entry per prompt token, None for the first (nothing predicts it).
PromptLogprobs = list[TokenLogprob | None]
