"""The padded static-buffer path that CUDA graphs replay, run eagerly on the CPU.

Greedy tokens must equal the plain runner's while batches shrink through the buckets (padding rows
that must neither write the cache nor disturb real rows), and batches larger than the biggest bucket
must fall back to the plain path. The block pool ends whole.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.engine.cuda_graphs import DecodeGraphs, batch_buckets
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(128)[-3:] == [96, 112, 128]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    return [r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)]


def test_padded_decode_path_matches_plain_runner(small_model: Path) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(7900) for _ in range(rng.randint(3, 60))] for _ in range(9)]
    want = _generate(LLM(str(small_model)), prompts)

    llm = LLM(str(small_model))
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_cache, max_batch=5, max_blocks_per_seq=8, capture=False)
    runs: list[int] = []
    plain_run = graphs.run

    def counted_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(args[1].context_lens.shape[0])
        return plain_run(*args, **kwargs)

    graphs.run = counted_run  # type: ignore[method-assign]
    runner.graphs = graphs
    assert _generate(llm, prompts) == want
    assert max(runs) == 5 and 1 in runs and 3 in runs  # padded buckets used; batches of 6-9 ran plain
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
