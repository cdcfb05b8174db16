"""Token sampling: logits processors, greedy, temperature, min-p, top-k, top-p, per-request seeds, logprobs.

The order is vLLM's:

    raw logits ──► logprobs reported (log_softmax of the raw logits)
       │
       ▼
    logit_bias ─► min_tokens (EOS and stop ids to -inf) ─► repetition, frequency, presence penalties
       │
       ├─ temperature 0: argmax
       └─ otherwise: / temperature ─► min_p ─► top-k ─► top-p ─► exponential race

Random rows sample by the exponential race (argmax of p / E with E ~ Exp(1)), which equals
drawing from p. A seeded request draws its E from its own generator, seeded with
(seed, number of tokens generated so far), so its tokens do not depend on the batch.

When every row is `plain` (no processor and no logprobs) none of the processing runs: greedy rows
take one batched argmax, as before these features existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

from services.engine.logprobs import TokenLogprob
from services.engine.sampling_params import SamplingParams

_U64 = 2**64


class SampleRow(Protocol):
    """What the sampler reads of one row's request (ScheduledRequest is one). The token lists are the
    request's own, read, never written: output_token_ids holds the tokens generated before this step."""

    @property
    def sampling_params(self) -> SamplingParams: ...
    @property
    def num_generated(self) -> int: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def output_token_ids(self) -> Sequence[int]: ...
    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...


class SamplerOutput(NamedTuple):
    tokens: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # one per row; None where the row's params.logprobs is None


def generator_seed(seed: int, num_generated: int) -> int:
    """The torch generator seed of a request's draw number `num_generated`, for any int64 seed.

    seed × odd constant mod 2**64 is one-to-one over int64; folding the high half into the low one
    keeps distinct seeds apart on the CPU generator, whose mt19937 reads only the low 32 bits.
    """
    x = (seed * 1_000_003 + num_generated) % _U64
    return x ^ (x >> 32)


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


def _filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def _ids(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64, device=device)


def _process_row(row: torch.Tensor, r: SampleRow) -> None:
    """Applies logit_bias, min_tokens and the penalties to one row of logits, in place."""
    p = r.sampling_params
    if p.logit_bias:
        ids, biases = zip(*p.logit_bias, strict=True)
        row.index_add_(0, _ids(ids, row.device), torch.tensor(biases, dtype=row.dtype, device=row.device))
    if r.num_generated < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
        if banned:
            row[_ids(sorted(banned), row.device)] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.unique(_ids([*r.prompt_token_ids, *r.output_token_ids], row.device))
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and r.output_token_ids:
        seen, counts = torch.unique(_ids(r.output_token_ids, row.device), return_counts=True)
        row[seen] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def apply_processors(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """A copy of logits [B, V] with each non-plain row's logit_bias, min_tokens and penalties applied."""
    processed = logits.clone()
    for i, r in enumerate(rows):
        if not r.sampling_params.plain:
            _process_row(processed[i], r)
    return processed


def _draw(logits: torch.Tensor, rows: Sequence[SampleRow], greedy: list[int]) -> list[int]:
    """One token per row from (processed) logits; `greedy` holds each row's argmax."""
    tokens: list[int] = []
    for i, r in enumerate(rows):
        p = r.sampling_params
        if p.greedy:
            tokens.append(greedy[i])
            continue
        scaled = logits[i] / p.temperature
        if p.min_p > 0:
            scaled = _filter_min_p(scaled, p.min_p)
        probs = _filter_top_k_top_p(scaled, p.top_k, p.top_p).softmax(-1)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(generator_seed(p.seed, r.num_generated))
        race = torch.empty_like(probs).exponential_(generator=generator)
        tokens.append(int((probs / race).argmax()))
    return tokens


def token_logprobs(logprobs: torch.Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprob]:
    """TokenLogprob of token_ids[i] in row i of logprobs [M, V], with row i's num_top[i] most likely tokens.

    rank is 1 + the number of tokens strictly more likely, so tied tokens share a rank.
    """
    if not token_ids:
        return []
    targets = _ids(token_ids, logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0]
    ranks = ((logprobs > chosen[:, None]).sum(-1) + 1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(token_ids)
    if max(num_top):
        top_lp, top_ids = torch.topk(logprobs, max(num_top))
        tops = [tuple(zip(ids[:n], lps[:n], strict=True))
                for ids, lps, n in zip(top_ids.tolist(), top_lp.tolist(), num_top, strict=True)]
    return [
        TokenLogprob(token, lp, rank, top)
        for token, lp, rank, top in zip(token_ids, chosen.tolist(), ranks, tops, strict=True)
    ]


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> SamplerOutput:
    """logits: [B, V] float32, one row per request (not modified). Returns one token id per row."""
    if all(r.sampling_params.plain for r in rows):
        return SamplerOutput(_draw(logits, rows, logits.argmax(-1).tolist()), [None] * len(rows))
    processed = apply_processors(logits, rows)
    tokens = _draw(processed, rows, processed.argmax(-1).tolist())
    wanted = [i for i, r in enumerate(rows) if r.sampling_params.logprobs is not None]
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if wanted:
        raw = torch.log_softmax(logits[wanted], dim=-1)
        num_top = [rows[i].sampling_params.logprobs or 0 for i in wanted]
        for i, lp in zip(wanted, token_logprobs(raw, [tokens[i] for i in wanted], num_top), strict=True):
            logprobs[i] = lp
    return SamplerOutput(tokens, logprobs)
