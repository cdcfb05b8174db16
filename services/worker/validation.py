"""Prompt checks shared by the router (before dispatch) and the engine (on add): pure Python, no torch."""

from __future__ import annotations

from services.engine.errors import InvalidRequest
from services.engine.sampling_params import SamplingParams


def validate_prompt(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raises InvalidRequest with a message a client can act on."""
    if not prompt_token_ids:
        raise InvalidRequest("the prompt is empty")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    n = len(prompt_token_ids)
    wanted = params.max_tokens or 1
    if n + wanted > max_model_len:
        raise InvalidRequest(
            f"the prompt ({n} tokens) plus max_tokens ({wanted}) exceeds the model's context of {max_model_len} tokens"
        )
    bad_stop = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad_stop is not None:
        raise InvalidRequest(f"stop token id {bad_stop} is outside the vocabulary [0, {vocab_size})")
    bad_bias = next((t for t, _ in params.logit_bias if t >= vocab_size), None)
    if bad_bias is not None:
        raise InvalidRequest(f"logit_bias token id {bad_bias} is outside the vocabulary [0, {vocab_size})")
