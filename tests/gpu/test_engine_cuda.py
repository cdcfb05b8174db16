"""The engine on CUDA, through the compiled Triton kernels, against transformers on the same GPU.

float32 (IEEE dot products in the kernels, TF32 off in torch) must match transformers token for
token, as on the CPU, with decode steps run eagerly or replayed from CUDA graphs. bfloat16 rounds
differently in every matmul, so there only the first token of most prompts must agree. Every
scenario leaves the block pool whole. Skipped without a CUDA device.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from services.bench.offline import hf_generate, load_transformers
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUM_OUT = 32
LENGTHS = [1, 2, 7, 15, 16, 17, 31, 64, 100, 150, 200, 257, 300, 333, 390, 400]


def _prompts(seed: int = 0) -> list[list[int]]:
    """16 prompts; the second half share a 100-token prefix, so later ones hit the prefix cache."""
    rng = random.Random(seed)
    shared = [rng.randrange(7900) for _ in range(100)]
    prompts = [[rng.randrange(7900) for _ in range(n)] for n in LENGTHS]
    return [p if i < 8 else shared + p[100:] if len(p) > 100 else p for i, p in enumerate(prompts)]


def _engine_greedy(model: Path, prompts: list[list[int]], dtype: str, **kwargs: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model), device="cuda", dtype=dtype, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True)
    results = llm.generate(prompts, params, use_tqdm=False)
    assert all(r.error is None for r in results)
    return [r.token_ids for r in results], llm


def _assert_pool_whole(llm: LLM) -> None:
    manager = llm.engine.block_manager
    manager.check_integrity()
    assert manager.num_free_blocks == manager.num_blocks


@pytest.fixture(scope="module")
def tf32_off() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("mode", ["eager", "graphs", "graphs-chunked"])
def test_float32_matches_transformers_token_for_token(tiny_model: Path, tf32_off: None, mode: str) -> None:
    prompts = _prompts()
    want = hf_generate(load_transformers(str(tiny_model), "cuda", torch.float32), prompts, NUM_OUT)
    options = {"enforce_eager": mode == "eager", "max_num_seqs": 16}
    if mode == "graphs-chunked":
        options["max_num_batched_tokens"] = 96
    got, llm = _engine_greedy(tiny_model, prompts, "float32", **options)
    assert (llm.engine.runner.graphs is None) == (mode == "eager")
    assert got == want
    _assert_pool_whole(llm)


def test_bfloat16_agrees_with_transformers(tiny_model: Path) -> None:
    prompts = _prompts(1)
    want = hf_generate(load_transformers(str(tiny_model), "cuda", torch.bfloat16), prompts, NUM_OUT)
    got, llm = _engine_greedy(tiny_model, prompts, "bfloat16")
    first_agree = sum(g[0] == w[0] for g, w in zip(got, want, strict=True))
    assert first_agree >= 14, f"first token agrees for only {first_agree}/16 prompts"
    _assert_pool_whole(llm)
