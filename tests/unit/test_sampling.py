"""SamplingParams validation and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import pytest
import torch

from services.engine.errors import InvalidRequest
from services.engine.sampler import sample
from services.engine.sampling_params import SamplingParams

V = 32


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_params_are_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_params_normalise_lists_and_a_single_stop_string() -> None:
    p = SamplingParams(stop="END", stop_token_ids=[3, 4])
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


def test_from_dict_refuses_unknown_keys_by_name() -> None:
    with pytest.raises(InvalidRequest, match="unknown sampling parameter.*best_of"):
        SamplingParams.from_dict({"max_tokens": 4, "best_of": 2})
    assert SamplingParams.from_dict({"max_tokens": None, "top_k": None}).max_tokens is None
    assert SamplingParams.from_dict({"temperature": 0, "seed": 3}) == SamplingParams(temperature=0, seed=3)


def test_greedy_is_argmax() -> None:
    logits = logits_rows(4)
    tokens = sample(logits, [SamplingParams(temperature=0)] * 4, [0] * 4)
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy_at_any_temperature() -> None:
    logits = logits_rows(8, seed=1)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=5.0, top_k=1), SamplingParams(temperature=5.0, top_p=1e-6)):
        for n in range(5):
            assert sample(logits, [params] * 8, [n] * 8) == greedy


def test_top_k_and_top_p_keep_samples_in_their_set() -> None:
    row = logits_rows(1, seed=2)
    top3 = set(torch.topk(row[0], 3).indices.tolist())
    probs = row[0].softmax(-1)
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = set(), 0.0
    for t in order:
        nucleus.add(t)
        mass += float(probs[t])
        if mass >= 0.6:
            break
    k_seen, p_seen = set(), set()
    for seed in range(300):
        k_seen.add(sample(row, [SamplingParams(top_k=3, seed=seed)], [0])[0])
        p_seen.add(sample(row, [SamplingParams(top_p=0.6, seed=seed)], [0])[0])
    assert k_seen == top3
    assert p_seen == nucleus


def test_samples_follow_the_temperature_scaled_distribution() -> None:
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.7
    expected = (row[0] / temperature).softmax(-1)
    n = 4000
    params = SamplingParams(temperature=temperature)
    torch.manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(row, [params], [0])[0] for _ in range(n)]), minlength=4)
    observed = counts.float() / n
    # 5 standard errors of a binomial proportion: fails only when the sampler draws from another distribution.
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((observed - expected).abs() < tolerance), (observed, expected)


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    mine = SamplingParams(temperature=1.0, seed=1234)
    logits = logits_rows(5, seed=3)
    alone = [sample(logits[2:3], [mine], [n])[0] for n in range(20)]
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), SamplingParams(top_k=4, seed=9),
              SamplingParams(temperature=2.0)]
    batch_params = others[:2] + [mine] + others[2:]
    in_batch = [sample(logits, batch_params, [n + 3] * 5)[2] for n in range(20)]
    in_batch_same_step = [sample(logits, batch_params, [0, 0, n, 0, 0])[2] for n in range(20)]
    assert alone == in_batch_same_step
    assert in_batch == [sample(logits[2:3], [mine], [n + 3])[0] for n in range(20)]


def test_different_seeds_give_different_samples() -> None:
    row = torch.zeros(1, V)  # uniform: two seeds agreeing on 20 draws has probability 32**-20
    draws = {seed: [sample(row, [SamplingParams(seed=seed)], [n])[0] for n in range(20)] for seed in (1, 2)}
    assert draws[1] != draws[2]
    assert len(set(draws[1])) > 1  # the step counter changes the draw too


def test_unseeded_sampling_varies() -> None:
    row = torch.zeros(1, V)
    draws = {sample(row, [SamplingParams()], [0])[0] for _ in range(50)}
    assert len(draws) > 5
