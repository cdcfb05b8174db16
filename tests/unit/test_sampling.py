"""SamplingParams validation and the sampler: greedy, temperature, top-k, top-p, min-p, per-request seeds,
logit_bias, min_tokens, the three penalties and logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from services.engine.errors import InvalidRequest
from services.engine.sampler import apply_processors, generator_seed, sample
from services.engine.sampling_params import SamplingParams

V = 32
EOS = 5


@dataclass
class Row:
    """A SampleRow: what the sampler reads of a request."""

    sampling_params: SamplingParams
    num_generated: int = 0
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: tuple[int, ...] = (EOS,)


def rows(params: Sequence[SamplingParams], num_generated: Sequence[int]) -> list[Row]:
    return [Row(p, n) for p, n in zip(params, num_generated, strict=True)]


def draw(logits: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int]) -> list[int]:
    return sample(logits, rows(params, num_generated)).tokens


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
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
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
    assert draw(logits, [SamplingParams(temperature=0)] * 4, [0] * 4) == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy_at_any_temperature() -> None:
    logits = logits_rows(8, seed=1)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=5.0, top_k=1), SamplingParams(temperature=5.0, top_p=1e-6)):
        for n in range(5):
            assert draw(logits, [params] * 8, [n] * 8) == greedy


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
        k_seen.add(draw(row, [SamplingParams(top_k=3, seed=seed)], [0])[0])
        p_seen.add(draw(row, [SamplingParams(top_p=0.6, seed=seed)], [0])[0])
    assert k_seen == top3
    assert p_seen == nucleus


def test_samples_follow_the_temperature_scaled_distribution() -> None:
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.7
    expected = (row[0] / temperature).softmax(-1)
    n = 4000
    params = SamplingParams(temperature=temperature)
    torch.manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(row, [params], [0])[0] for _ in range(n)]), minlength=4)
    observed = counts.float() / n
    # 5 standard errors of a binomial proportion: fails only when the sampler draws from another distribution.
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((observed - expected).abs() < tolerance), (observed, expected)


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    mine = SamplingParams(temperature=1.0, seed=1234)
    logits = logits_rows(5, seed=3)
    alone = [draw(logits[2:3], [mine], [n])[0] for n in range(20)]
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), SamplingParams(top_k=4, seed=9),
              SamplingParams(temperature=2.0)]
    batch_params = others[:2] + [mine] + others[2:]
    in_batch = [draw(logits, batch_params, [n + 3] * 5)[2] for n in range(20)]
    in_batch_same_step = [draw(logits, batch_params, [0, 0, n, 0, 0])[2] for n in range(20)]
    assert alone == in_batch_same_step
    assert in_batch == [draw(logits[2:3], [mine], [n + 3])[0] for n in range(20)]


def test_different_seeds_give_different_samples() -> None:
    row = torch.zeros(1, V)  # uniform: two seeds agreeing on 20 draws has probability 32**-20
    draws = {seed: [draw(row, [SamplingParams(seed=seed)], [n])[0] for n in range(20)] for seed in (1, 2)}
    assert draws[1] != draws[2]
    assert len(set(draws[1])) > 1  # the step counter changes the draw too


def test_unseeded_sampling_varies() -> None:
    row = torch.zeros(1, V)
    draws = {draw(row, [SamplingParams()], [0])[0] for _ in range(50)}
    assert len(draws) > 5


# ---- params of the sampling features -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {3: 101}}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_bad_feature_params_are_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_plain_params_and_for_sample() -> None:
    assert SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=1).plain
    for kwargs in ({"presence_penalty": 0.1}, {"frequency_penalty": 0.1}, {"repetition_penalty": 1.1},
                   {"min_p": 0.1}, {"min_tokens": 1}, {"logit_bias": {1: 1}}, {"logprobs": 0}):
        assert not SamplingParams(**kwargs).plain, kwargs  # type: ignore[arg-type]
    p = SamplingParams(n=3, seed=2**63 - 1, prompt_logprobs=2)
    assert [q.seed for q in (p.for_sample(0), p.for_sample(1))] == [2**63 - 1, -(2**63)]
    assert p.for_sample(1).n == 1 and p.for_sample(0).prompt_logprobs == 2 and p.for_sample(1).prompt_logprobs is None
    assert SamplingParams(logit_bias={"7": -2, 3: 1.5}).logit_bias == ((3, 1.5), (7, -2.0))


# ---- processors ---------------------------------------------------------------------------------------------


def test_the_plain_path_is_argmax_and_reports_no_logprobs() -> None:
    logits = logits_rows(6, seed=4)
    before = logits.clone()
    out = sample(logits, rows([SamplingParams(temperature=0)] * 6, [0] * 6))
    assert out.tokens == logits.argmax(-1).tolist() and out.logprobs == [None] * 6
    assert torch.equal(logits, before)


def test_processors_apply_bias_then_min_tokens_then_penalties() -> None:
    logits = logits_rows(1, seed=5)
    before = logits.clone()
    prompt, output = [1, 2, 2, 9], [9, 3, 3, 3, 4]
    params = SamplingParams(
        logit_bias={1: 4.0, EOS: 2.0, 8: -1.0}, min_tokens=10, stop_token_ids=[7],
        repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=0.5,
    )
    got = apply_processors(logits, [Row(params, len(output), prompt, output)])[0]
    assert torch.equal(logits, before)  # CUDA graphs replay into the same logits buffer: never written

    want = logits[0].clone()
    want[1] += 4.0
    want[EOS] += 2.0
    want[8] -= 1.0
    want[EOS] = want[7] = float("-inf")
    for t in {*prompt, *output}:
        want[t] = want[t] / 1.7 if want[t] > 0 else want[t] * 1.7
    for t in set(output):
        want[t] -= 0.3 * output.count(t) + 0.5
    assert torch.equal(got.isinf(), want.isinf())
    finite = ~want.isinf()
    assert torch.allclose(got[finite], want[finite], atol=1e-6)


def test_min_tokens_lifts_at_min_tokens_and_ignore_eos_leaves_eos() -> None:
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 3] = 8.0
    blocked = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7])
    assert draw(logits, [blocked], [1]) == [3]
    assert draw(logits, [blocked], [2]) == [EOS]
    ignoring = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    assert draw(logits, [ignoring], [0]) == [EOS]


def test_a_large_logit_bias_forces_its_token_even_when_sampling() -> None:
    logits = logits_rows(3, seed=6)
    weakest = int(logits[1].argmin())
    forced = SamplingParams(temperature=1.0, logit_bias={weakest: 100}, seed=3)
    out = draw(logits, [SamplingParams(temperature=0), forced, SamplingParams(temperature=0)], [0] * 3)
    assert out == [int(logits[0].argmax()), weakest, int(logits[2].argmax())]


def test_min_p_keeps_samples_in_its_set() -> None:
    row = logits_rows(1, seed=7)
    temperature = 2.5
    probs = (row[0] / temperature).softmax(-1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero()[:, 0].tolist())
    seen = {draw(row, [SamplingParams(temperature=temperature, min_p=0.2, seed=s)], [0])[0] for s in range(300)}
    assert seen == allowed and len(allowed) > 1


def test_processed_rows_in_a_mixed_batch_leave_the_plain_rows_alone() -> None:
    logits = logits_rows(4, seed=8)
    plain = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=11)]
    alone = draw(logits[[0, 2]], plain, [0, 0])
    mixed = [plain[0], SamplingParams(temperature=0, repetition_penalty=2.0), plain[1], SamplingParams(min_p=0.5)]
    assert [draw(logits, mixed, [0] * 4)[i] for i in (0, 2)] == alone


# ---- seeds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**32, 2**63 - 1])
def test_every_int64_seed_seeds_a_reproducible_draw(seed: int) -> None:
    row = torch.zeros(1, V)
    params = SamplingParams(seed=seed)
    first = [draw(row, [params], [n])[0] for n in range(16)]
    assert first == [draw(row, [params], [n])[0] for n in range(16)]
    assert 0 <= generator_seed(seed, 0) < 2**64


def test_seeds_that_share_their_low_bits_draw_differently() -> None:
    """The CPU generator reads 32 bits of its seed: seeds equal modulo 2**32 (or 2**63) must still differ."""
    row = torch.zeros(1, V)
    for a, b in ((-1, 2**63 - 1), (5, 5 + 2**32), (0, 2**63 - 2**32)):
        draws = [[draw(row, [SamplingParams(seed=s)], [n])[0] for n in range(20)] for s in (a, b)]
        assert draws[0] != draws[1], (a, b)
    assert generator_seed(42, 3) == 42 * 1_000_003 + 3  # small seeds keep the streams they always had


# ---- logprobs ---------------------------------------------------------------------------------------------------


def test_logprobs_are_the_raw_distribution_with_rank_and_top() -> None:
    logits = logits_rows(3, seed=9)
    logits[1, 4] = logits[1, 6] = logits[1].max() + 1  # a tie for the top
    params = [
        SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0, logit_bias={0: 50}),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0),
    ]
    out = sample(logits, [Row(params[0], 0, [1, 2]), Row(params[1]), Row(params[2])])
    raw = logits.log_softmax(-1)
    assert out.tokens[0] == 0  # the bias decides the token, not the reported distribution
    assert out.logprobs[2] is None
    first, second = out.logprobs[0], out.logprobs[1]
    assert first is not None and second is not None
    assert first.token_id == 0 and first.logprob == pytest.approx(float(raw[0, 0]), abs=1e-6)
    assert first.rank == int((raw[0] > raw[0, 0]).sum()) + 1 and first.rank > 1
    top = torch.topk(raw[0], 3)
    assert [t for t, _ in first.top] == top.indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert second.token_id in (4, 6) and second.rank == 1 and second.top == ()
