"""The engine resuming a request from replayed tokens, as a decode worker does for a migrated request
(services/router/migration.py): the rest of the output is exactly the rest of the un-failed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine import LLM
from services.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=0.7, min_tokens=20),
    SamplingParams(temperature=0.9, top_p=0.9, seed=77, max_tokens=24, ignore_eos=True, presence_penalty=0.5),
], ids=["greedy-penalties", "seeded"])
def test_an_engine_resuming_replayed_tokens_continues_the_same_output(small_model: Path, torch_one_thread: None,
                                                                      params: SamplingParams) -> None:
    """DecodeWorker.generate(local, generated=...) is LLMEngine.add_request(generated=...): the tokens the client
    has count as generated (max_tokens, min_tokens, penalties, the seeded draw's position), so the rest of the
    output is exactly the rest of the un-failed one."""
    llm = LLM(str(small_model), num_blocks=64, max_model_len=256)
    prompt = list(range(30, 70))
    whole = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    for cut in (1, 9, 23):
        llm.engine.add_request(f"resumed-{cut}", prompt, params, generated=whole[:cut])
        rest: list[int] = []
        while llm.engine.has_unfinished():
            for out in llm.engine.step():
                rest += out.new_token_ids
        assert whole[:cut] + rest == whole, cut
