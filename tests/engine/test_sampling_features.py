"""The sampling features end to end through the offline LLM API, against a float32 transformers forward pass.

Logprobs (sampled tokens' and the prompt's) must equal transformers' log_softmax to 1e-4, whether the
prompt ran in chunks or its prefix sat in the prefix cache. Greedy decoding with each logits processor
must equal a step-by-step reference written here in plain torch over transformers' logits. Seeded
sampling, with any int64 seed and n outputs, must not depend on what shares the batch. Every scenario
leaves the block pool intact and empty.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from services.bench.offline import load_transformers
from services.engine.cuda_graphs import DecodeGraphs
from services.engine.llm import LLM, GenerationResult
from services.engine.logprobs import TokenLogprob
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TOL = 1e-4


@pytest.fixture(scope="module")
def hf(small_model: Path) -> Any:
    return load_transformers(str(small_model), "cpu", torch.float32)


@pytest.fixture(scope="module")
def make_llm(small_model: Path) -> Callable[..., LLM]:
    def make(**kwargs: Any) -> LLM:
        kwargs.setdefault("num_blocks", 128)
        return LLM(str(small_model), **kwargs)

    return make


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(7900) for _ in range(n)]  # ids below the special tokens of the BPE vocabulary


def hf_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_clean(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished()


def assert_matches(got: TokenLogprob | None, want: torch.Tensor, token: int, num_top: int) -> None:
    """got is the logprob of `token` under the reference distribution `want` [vocab], with num_top alternatives."""
    assert got is not None and got.token_id == token
    x = float(want[token])
    assert got.logprob == pytest.approx(x, abs=TOL)
    # Ranks and top ids are compared allowing for near-ties that a 1e-4 difference may reorder.
    assert int((want > x + TOL).sum()) + 1 <= got.rank <= int((want > x - TOL).sum()) + 1
    assert len(got.top) == num_top
    ref_top = torch.topk(want, num_top).values.tolist()
    assert [lp for _, lp in got.top] == pytest.approx(ref_top, abs=TOL)
    assert all(abs(float(want[t]) - lp) < TOL for t, lp in got.top)


def check_logprobs(hf: Any, result: GenerationResult, num_top: int, prompt_top: int) -> None:
    prompt, out = result.prompt_token_ids, result.outputs[0]
    ref = hf_logprobs(hf, prompt + out.token_ids)
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(prompt)
    assert result.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert_matches(result.prompt_logprobs[i], ref[i - 1], prompt[i], prompt_top)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for k, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert_matches(lp, ref[len(prompt) - 1 + k], token, num_top)
        assert token == int(ref[len(prompt) - 1 + k].argmax())  # greedy


def test_logprobs_and_prompt_logprobs_match_transformers(hf: Any, make_llm: Callable[..., LLM]) -> None:
    llm = make_llm(max_num_batched_tokens=64)
    long = tokens(150, seed=1)  # three chunks of at most 64 tokens
    asked = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    short, single = tokens(9, seed=2), tokens(1, seed=3)
    results = llm.generate([long, short, single], asked, use_tqdm=False)
    for r in results:
        check_logprobs(hf, r, 3, 2)
    assert results[2].prompt_logprobs == [None]
    assert_clean(llm)

    # Now the first 112 tokens of `shared` are in the prefix cache: prompt logprobs still cover all of it.
    shared = long[:120] + tokens(20, seed=4)
    (cached,) = llm.generate([shared], asked, use_tqdm=False)
    check_logprobs(hf, cached, 3, 2)
    assert cached.usage.cached_tokens == 0
    (plain,) = llm.generate([shared], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert plain.usage.cached_tokens >= 112 and plain.token_ids == cached.token_ids and plain.prompt_logprobs is None
    assert plain.outputs[0].logprobs is None
    assert_clean(llm)


def test_logprobs_none_leaves_request_outputs_without_logprobs(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    engine = llm.engine
    engine.add_request("plain", tokens(20, seed=5), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add_request("asked", tokens(20, seed=6), SamplingParams(temperature=0.8, seed=1, max_tokens=4,
                                                                   ignore_eos=True, logprobs=1))
    outputs: dict[str, list[Any]] = {"plain": [], "asked": []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in outputs["plain"])
    assert all(o.logprobs is not None and [lp.token_id for lp in o.logprobs] == o.new_token_ids
               and len(o.logprobs[0].top) == 1 for o in outputs["asked"])
    assert_clean(llm)


# ---- greedy with processors == a plain-torch reference ------------------------------------------------------


def reference_greedy(hf: Any, prompt: list[int], p: SamplingParams, eos: tuple[int, ...]) -> list[int]:
    """Step-by-step greedy over transformers' logits with vLLM's processors, written out for one sequence."""
    out: list[int] = []
    while len(out) < (p.max_tokens or 0):
        logits = last_logits(hf, prompt + out)
        for token, bias in p.logit_bias:
            logits[token] += bias
        if len(out) < p.min_tokens:
            for token in (*p.stop_token_ids, *(() if p.ignore_eos else eos)):
                logits[token] = float("-inf")
        for token in set(prompt + out):
            value = logits[token]
            logits[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(out):
            logits[token] -= p.frequency_penalty * out.count(token) + p.presence_penalty
        out.append(int(logits.argmax()))
        if (not p.ignore_eos and out[-1] in eos) or out[-1] in p.stop_token_ids:
            break
    return out


def last_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def test_greedy_with_each_processor_equals_the_reference(hf: Any, make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    eos = llm.engine.model_config.eos_token_ids
    prompt = tokens(24, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = reference_greedy(hf, prompt, greedy, eos)
    # A random model rarely repeats itself, so biases set up races that each processor decides:
    # `first` makes the first token a close second at step 1; `echo` makes prompt token x win step 0 by 1.
    t0, t1 = plain[:2]
    l0, l1 = last_logits(hf, prompt), last_logits(hf, prompt + [t0])
    first = {t0: round(float(l1[t1] - l1[t0]) - 1.0, 3)}
    x = prompt[3]
    echo = {x: round(float(l0.max() - l0[x]) + 1.0, 3)}

    def params(**kwargs: Any) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **kwargs)

    variants = {  # name: (params, the variant without the processor, whose output it must change)
        "first": (params(logit_bias=first), None),
        "presence": (params(logit_bias=first, presence_penalty=-2.0), "first"),
        "frequency": (params(logit_bias=first, frequency_penalty=-2.0), "first"),
        "repetition": (params(logit_bias=first, repetition_penalty=0.5), "first"),
        "echo": (params(logit_bias=echo), None),
        "echo-repetition": (params(logit_bias=echo, repetition_penalty=1.8), "echo"),
        "echo-frequency": (params(logit_bias=echo, frequency_penalty=2.0), "echo"),
        "echo-all": (params(logit_bias=echo, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5),
                     None),
        "min_p": (params(min_p=0.5), None),  # greedy keeps the top token, which min_p never drops
    }
    want = {name: reference_greedy(hf, prompt, p, eos) for name, (p, _) in variants.items()}
    assert want["first"] != plain and want["echo"] != plain
    for name, (_, base) in variants.items():
        assert base is None or want[name] != want[base], f"{name} does not change {base}'s output"
    # One batch: the plain request and every variant share steps, so plain and processed rows mix.
    all_params = [greedy, *(p for p, _ in variants.values())]
    results = llm.generate([prompt] * len(all_params), all_params, use_tqdm=False)
    assert results[0].token_ids == plain
    for name, result in zip(variants, results[1:], strict=True):
        assert result.token_ids == want[name], name
    assert_clean(llm)


def test_logit_bias_forces_a_token_and_min_tokens_holds_off_eos(hf: Any, make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    eos = llm.engine.model_config.eos_token_ids
    prompt = tokens(16, seed=8)
    forced = SamplingParams(temperature=0.7, seed=5, max_tokens=6, ignore_eos=True, logit_bias={1234: 100})
    (result,) = llm.generate([prompt], forced, use_tqdm=False)
    assert result.token_ids == [1234] * 6

    to_eos = {eos[0]: 100}  # EOS wins every step unless something stops it
    (early,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logit_bias=to_eos), use_tqdm=False)
    assert early.token_ids == [eos[0]] and early.finish_reason == "stop"
    held = SamplingParams(temperature=0, max_tokens=8, logit_bias=to_eos, min_tokens=3)
    (late,) = llm.generate([prompt], held, use_tqdm=False)
    assert late.token_ids == reference_greedy(hf, prompt, held, eos)
    assert len(late.token_ids) == 4 and late.token_ids[-1] == eos[0] and late.finish_reason == "stop"
    assert eos[0] not in late.token_ids[:3]
    assert_clean(llm)


# ---- seeds and n ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**63 - 1])
def test_seeded_sampling_ignores_the_batch_for_any_int64_seed(seed: int, make_llm: Callable[..., LLM]) -> None:
    llm = make_llm(max_num_batched_tokens=64)
    prompt = tokens(40, seed=9)
    mine = SamplingParams(temperature=1.0, seed=seed, max_tokens=10, ignore_eos=True, min_p=0.01,
                          presence_penalty=0.5, logprobs=1)
    (alone,) = llm.generate([prompt], mine, use_tqdm=False)
    others = [tokens(30 + 7 * i, seed=20 + i) for i in range(3)]
    other_params = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
                    SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, repetition_penalty=1.5),
                    SamplingParams(temperature=0.5, seed=seed, max_tokens=5, ignore_eos=True)]
    batch = llm.generate([*others, prompt], [*other_params, mine], use_tqdm=False)
    assert batch[-1].token_ids == alone.token_ids
    pairs = zip(batch[-1].outputs[0].logprobs or [], alone.outputs[0].logprobs or [], strict=True)
    assert all(a.token_id == b.token_id and abs(a.logprob - b.logprob) < TOL for a, b in pairs)
    assert_clean(llm)


def test_the_two_extreme_seeds_differ(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm()
    prompt = tokens(12, seed=10)
    draws = [llm.generate([prompt], SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].token_ids for s in (-1, 2**63 - 1)]
    assert draws[0] != draws[1]
    assert_clean(llm)


def test_n_outputs_are_seeded_reproducible_and_share_the_prompt_kv(make_llm: Callable[..., LLM]) -> None:
    llm = make_llm(block_size=16)
    prompt = tokens(40, seed=11)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, logprobs=0)
    llm.engine.block_manager.take_stats()
    (result,) = llm.generate([prompt], params, use_tqdm=False)
    _, hits = llm.engine.block_manager.take_stats()
    assert hits == 2 * 32  # outputs 1 and 2 find the prompt's two full blocks (the last token is recomputed)
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in result.outputs}) == 3
    assert all(o.logprobs is not None and [lp.token_id for lp in o.logprobs] == o.token_ids for o in result.outputs)
    assert result.token_ids == result.outputs[0].token_ids and result.finish_reason == "length"
    assert result.usage.prompt_tokens == 40 and result.usage.completion_tokens == 24
    assert result.usage.cached_tokens == 0

    (again,) = llm.generate([prompt], params, use_tqdm=False)
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in result.outputs]
    singles = llm.generate([prompt] * 3, [params.for_sample(i) for i in range(3)], use_tqdm=False)
    assert [r.token_ids for r in singles] == [o.token_ids for o in result.outputs]
    assert_clean(llm)


def test_n_with_prompt_logprobs_and_prefix_groups(make_llm: Callable[..., LLM]) -> None:
    """Two prompts with a common prefix, n=2 each: four outputs; prompt logprobs once per prompt."""
    llm = make_llm()
    shared = tokens(32, seed=12)
    prompts = [shared + tokens(5, seed=13), shared + tokens(9, seed=14)]
    params = SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    results = llm.generate(prompts, params, use_tqdm=False)
    for prompt, r in zip(prompts, results, strict=True):
        assert len(r.outputs) == 2 and all(len(o.token_ids) == 4 for o in r.outputs)
        assert r.prompt_logprobs is not None and len(r.prompt_logprobs) == len(prompt)
        assert [lp.token_id for lp in r.prompt_logprobs[1:] if lp is not None] == prompt[1:]
    assert_clean(llm)


def test_processed_rows_through_the_padded_decode_graph_path(make_llm: Callable[..., LLM]) -> None:
    """Decode steps replayed from the CUDA-graph buffers (run eagerly here) give the same tokens and logprobs."""
    prompts = [tokens(10 + 9 * i, seed=30 + i) for i in range(4)]
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=-5, max_tokens=6, ignore_eos=True, min_p=0.1, frequency_penalty=1.0),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2**63 - 1, max_tokens=6, ignore_eos=True, logprobs=0,
                       logit_bias={42: 3.0}),
    ]
    want = make_llm().generate(prompts, params, use_tqdm=False)
    llm = make_llm()
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, max_batch=4, max_blocks_per_seq=8, capture=False)
    replays = 0
    run = runner.graphs.run

    def counted(*args: Any) -> torch.Tensor:
        nonlocal replays
        replays += 1
        return run(*args)

    runner.graphs.run = counted  # type: ignore[method-assign]
    got = llm.generate(prompts, params, use_tqdm=False)
    assert replays > 0
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        pairs = zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or [], strict=True)
        assert all(x.token_id == y.token_id and x.rank == y.rank and abs(x.logprob - y.logprob) < TOL for x, y in pairs)
    assert_clean(llm)
