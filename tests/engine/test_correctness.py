"""Greedy output of the engine equals transformers (float32) token for token, in every scheduling regime.

One fixed set of 16 prompts (1 to 400 tokens; half of them share a long prefix) is run through
transformers once per model; every scenario then has to reproduce those tokens exactly, and leave
the block pool intact and empty.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from services.bench.offline import hf_generate, load_transformers
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.engine.engine import LLMEngine
from services.engine.llm import LLM, GenerationResult
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

NUM_OUT = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True)
LENGTHS = [1, 2, 7, 15, 16, 17, 31, 64, 100, 150, 200, 257, 300, 333, 390, 400]
SHARED = 200  # prompts 8..15 start with the same tokens, half their length


class Case(NamedTuple):
    model: Path
    prompts: list[list[int]]
    expected: list[list[int]]


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(7900) for _ in range(SHARED)]
    prompts = []
    for i, n in enumerate(LENGTHS):
        own = [rng.randrange(7900) for _ in range(n)]  # ids below the special tokens of the BPE vocabulary
        prompts.append(shared[: n // 2] + own[: n - n // 2] if i >= 8 else own)
    return prompts


def transformers_greedy(model_dir: Path, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """transformers' greedy `generate` (float32), all prompts in one left-padded batch, never stopping at EOS."""
    return hf_generate(load_transformers(str(model_dir), "cpu", torch.float32), prompts, num_tokens)


SMALL_MODEL: dict[str, Any] = {  # the `small_model` fixture's shape: 2 layers, hidden 128, GQA 4/2, untied
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MODELS: dict[str, dict[str, Any]] = {
    "gqa-untied": SMALL_MODEL,
    "mha-tied": {**SMALL_MODEL, "num_key_value_heads": 4, "tie_word_embeddings": True},
    "qwen2-bias": {**SMALL_MODEL, "qwen2": True, "tie_word_embeddings": True},
    "sharded": {**SMALL_MODEL, "shard_size_bytes": 300_000},
    "llama3-rope": {
        **SMALL_MODEL,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
    },
}


@pytest.fixture(scope="module")
def case_factory(make_test_model: Callable[..., Path]) -> Callable[[str], Case]:
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            model = make_test_model() if name == "tiny" else make_test_model(**MODELS[name])
            prompts = make_prompts()
            cache[name] = Case(model, prompts, transformers_greedy(model, prompts, NUM_OUT))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def gqa(case_factory: Callable[[str], Case]) -> Case:
    return case_factory("gqa-untied")


def assert_clean(engine: LLMEngine) -> None:
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def check(case: Case, results: list[GenerationResult]) -> None:
    for i, (result, expected) in enumerate(zip(results, case.expected, strict=True)):
        assert result.error is None
        assert result.token_ids == expected, f"prompt {i} ({len(case.prompts[i])} tokens) differs"
        assert result.finish_reason == "length"
        assert result.usage.prompt_tokens == len(case.prompts[i])
        assert result.usage.completion_tokens == NUM_OUT


def run_llm(case: Case, **kwargs: Any) -> tuple[LLM, list[GenerationResult]]:
    kwargs.setdefault("num_blocks", 512)
    llm = LLM(str(case.model), **kwargs)
    results = llm.generate(case.prompts, GREEDY, use_tqdm=False)
    check(case, results)
    assert_clean(llm.engine)
    return llm, results


def test_reference_prompts_cover_the_required_shapes(gqa: Case) -> None:
    assert len(gqa.prompts) >= 16
    assert min(map(len, gqa.prompts)) == 1 and max(map(len, gqa.prompts)) == 400
    assert all(len(t) == NUM_OUT for t in gqa.expected)
    assert len({tuple(t) for t in gqa.expected}) > 8  # the model is not degenerate


def test_no_chunking_no_prefix_cache(gqa: Case) -> None:
    _, results = run_llm(gqa, enable_chunked_prefill=False, enable_prefix_caching=False, max_num_batched_tokens=1024)
    assert all(r.usage.cached_tokens == 0 for r in results)


def test_chunked_prefill_with_a_budget_smaller_than_the_prompts(gqa: Case) -> None:
    llm, _ = run_llm(gqa, max_num_batched_tokens=48, enable_prefix_caching=False)
    assert llm.engine.config.scheduler.max_num_batched_tokens < max(map(len, gqa.prompts))


def test_shared_prefixes_hit_the_prefix_cache(gqa: Case) -> None:
    llm, first = run_llm(gqa, max_num_batched_tokens=256, block_size=16)
    followers = [r for r in first[8:] if len(r.prompt_token_ids) >= 64]
    assert sum(r.usage.cached_tokens for r in first) > 0
    assert any(r.usage.cached_tokens >= 16 for r in followers)
    # A second pass over the same prompts finds every full block but the one holding the last token.
    second = llm.generate(gqa.prompts, GREEDY, use_tqdm=False)
    check(gqa, second)
    assert [r.usage.cached_tokens for r in second] == [(len(p) - 1) // 16 * 16 for p in gqa.prompts]
    assert_clean(llm.engine)


def test_preemption_under_a_tiny_block_pool(gqa: Case) -> None:
    llm, _ = run_llm(gqa, num_blocks=32, max_model_len=512, max_num_batched_tokens=512)
    assert llm.engine.scheduler.num_preemptions > 0


def test_preemption_with_chunking_and_prefix_cache(gqa: Case) -> None:
    llm, _ = run_llm(gqa, num_blocks=40, max_model_len=512, max_num_batched_tokens=64, block_size=16)
    assert llm.engine.scheduler.num_preemptions > 0


def test_block_sizes_other_than_the_default(gqa: Case) -> None:
    run_llm(gqa, block_size=8, max_num_batched_tokens=100)
    run_llm(gqa, block_size=16, max_num_batched_tokens=100)


@pytest.mark.parametrize(("kv_dtype", "tolerance"), [("float16", 0.01), ("bfloat16", 0.05)])
def test_a_half_precision_kv_cache(gqa: Case, kv_dtype: str, tolerance: float) -> None:
    """kv_cache_dtype float16/bfloat16 under float32 weights: twice the blocks in the same bytes, and each
    token's logprob within `tolerance` of the float32 cache's until their greedy tokens part (a near tie)."""
    params = SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True, logprobs=0)
    full = LLM(str(gqa.model), kv_cache_bytes=2**24)
    half = LLM(str(gqa.model), kv_cache_bytes=2**24, kv_cache_dtype=kv_dtype)
    assert half.engine.num_blocks == 2 * full.engine.num_blocks
    assert half.engine.kv_cache.dtype == getattr(torch, kv_dtype)
    agreed = 0
    for a, b in zip(full.generate(gqa.prompts, params, use_tqdm=False),
                    half.generate(gqa.prompts, params, use_tqdm=False), strict=True):
        logprobs = zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or [], strict=True)
        for x, y, (lx, ly) in zip(a.token_ids, b.token_ids, logprobs, strict=True):
            assert abs(lx.logprob - ly.logprob) < tolerance
            if x != y:
                break
            agreed += 1
    assert agreed >= 0.8 * NUM_OUT * len(gqa.prompts)
    assert_clean(half.engine)


def test_decode_attention_in_many_small_groups(gqa: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU decode path splits the batch into groups by K/V bytes; force one or two sequences per group."""
    import kernels.attention

    monkeypatch.setattr(kernels.attention, "DECODE_GROUP_BYTES", 64 * 1024)
    run_llm(gqa, max_num_batched_tokens=512)


def test_engine_directly_with_late_arrivals_priorities_and_an_abort(gqa: Case) -> None:
    config = EngineConfig(
        model=str(gqa.model),
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=128),
    )
    engine = LLMEngine(config)
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str | None] = {}
    pending = list(range(len(gqa.prompts)))
    engine.add_request("doomed", gqa.prompts[-1], GREEDY)
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:  # one new request every third step, alternating priorities
            i = pending.pop(0)
            engine.add_request(f"r{i}", gqa.prompts[i], GREEDY, priority=i % 2)
        if steps == 4:
            engine.abort(["doomed"])
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
        steps += 1
    assert "doomed" not in finished
    for i, expected in enumerate(gqa.expected):
        assert tokens[f"r{i}"] == expected, f"prompt {i} differs"
        assert finished[f"r{i}"] == "length"
    assert_clean(engine)


@pytest.mark.parametrize("name", ["mha-tied", "qwen2-bias", "sharded", "llama3-rope", "tiny"])
def test_other_architectures(case_factory: Callable[[str], Case], name: str) -> None:
    run_llm(case_factory(name), max_num_batched_tokens=128)


def test_seeded_sampling_is_independent_of_the_batch(gqa: Case) -> None:
    llm = LLM(str(gqa.model), num_blocks=256)
    mine = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=24, ignore_eos=True)
    prompt = gqa.prompts[9]
    alone = llm.generate([prompt], mine, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=s) for s in range(5)]
    batch = llm.generate([*gqa.prompts[:5], prompt], [*others, mine], use_tqdm=False)
    assert batch[-1].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(**{**_fields(mine), "seed": 43}), use_tqdm=False)[0]
    assert other_seed.token_ids != alone
    assert alone != gqa.expected[9][:24]  # sampling at temperature 0.9 is not greedy
    assert_clean(llm.engine)


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {k: getattr(params, k) for k in params.__dataclass_fields__}


def test_single_row_steps_run_on_their_own_thread_count(gqa: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """single_row_threads (a served decode worker's 1): a step of one row runs on that many torch threads, any
    other step on num_threads, and the count is restored after each step."""
    from services.engine.models.llama import LlamaForCausalLM

    seen: list[tuple[int, int]] = []
    forward = LlamaForCausalLM.forward

    def recording(self: LlamaForCausalLM, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((input_ids.shape[0], torch.get_num_threads()))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", recording)
    before = torch.get_num_threads()
    try:
        llm = LLM(str(gqa.model), num_threads=2, single_row_threads=1, num_blocks=64)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        llm.generate([gqa.prompts[9]], params, use_tqdm=False)  # a prompt, then decodes of one row
        llm.generate([gqa.prompts[5], gqa.prompts[10]], params, use_tqdm=False)  # decodes of two rows
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert {threads for rows, threads in seen if rows == 1} == {1}
    assert {threads for rows, threads in seen if rows > 1} == {2}
    with pytest.raises(ValueError, match="single_row_threads must be positive"):
        EngineConfig(model="m", single_row_threads=0)
