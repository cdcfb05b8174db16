"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Random rows sample by the exponential race (argmax of p / E with E ~ Exp(1)), which equals
drawing from p. A seeded request draws its E from its own generator, seeded with
(seed, number of tokens generated so far), so its tokens do not depend on the batch.
"""

from __future__ import annotations

import torch

from services.engine.sampling_params import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], num_generated: list[int]) -> list[int]:
    """logits: [B, V] float32, one row per request. Returns one token id per row."""
    greedy = logits.argmax(-1).tolist()
    tokens: list[int] = []
    for row, (p, n) in enumerate(zip(params, num_generated, strict=True)):
        if p.greedy:
            tokens.append(greedy[row])
            continue
        scaled = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = scaled.softmax(-1)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed((p.seed * 1_000_003 + n) % (2**63))
        race = torch.empty_like(probs).exponential_(generator=generator)
        tokens.append(int((probs / race).argmax()))
    return tokens
