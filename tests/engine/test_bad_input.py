"""Bad requests get a clear per-request error while the rest of the batch completes; stops end with "stop"."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from services.engine.errors import InvalidRequest
from services.engine.llm import LLM
from services.engine.offline import run_offline
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MAX_LEN = 256
GOOD = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(small_model: Path) -> LLM:
    return LLM(str(small_model), num_blocks=64, block_size=16, max_model_len=MAX_LEN)  # GOOD spans a 16-token block


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[int]:
    """What GOOD greedily continues with, 24 tokens, alone in a batch."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return llm.generate([GOOD], params, use_tqdm=False)[0].token_ids


def assert_clean(llm: LLM) -> None:
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], GREEDY, "prompt is empty"),
        ("", GREEDY, "prompt is empty"),
        (list(range(MAX_LEN - 4)), GREEDY, "exceeds the model's context of 256"),
        (list(range(MAX_LEN)), SamplingParams(max_tokens=None), "exceeds the model's context"),
        ([1, 2, 8192], GREEDY, r"token id 8192 is outside the vocabulary \[0, 8192\)"),
        ([1, -5, 3], GREEDY, "token id -5 is outside the vocabulary"),
        ([1, 2], SamplingParams(stop_token_ids=[9000]), "stop token id 9000"),
    ],
)
def test_a_bad_request_errors_and_the_others_complete(
    llm: LLM, reference: list[int], prompt: list[int] | str, params: SamplingParams, message: str
) -> None:
    results = llm.generate([GOOD, prompt, GOOD], [GREEDY, params, GREEDY], use_tqdm=False)
    bad = results[1]
    assert bad.error is not None and bad.finish_reason == "error" and bad.token_ids == []
    assert re.search(message, bad.error), bad.error
    for good in (results[0], results[2]):
        assert good.error is None and good.token_ids == reference[:8] and good.finish_reason == "length"
    assert_clean(llm)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"temperature": -1.0}, "temperature must be a number >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1"),
    ],
)
def test_bad_sampling_params_are_refused_at_construction(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_max_tokens_none_runs_to_the_context_end(llm: LLM) -> None:
    prompt = list(range(100, 100 + MAX_LEN - 3))
    (result,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert result.finish_reason == "length" and len(result.token_ids) == 3
    assert_clean(llm)


def test_stop_token_ids_finish_with_stop(llm: LLM, reference: list[int]) -> None:
    stop_id = reference[5]
    first = reference.index(stop_id)
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id])
    (result,) = llm.generate([GOOD], params, use_tqdm=False)
    assert result.finish_reason == "stop"
    assert result.token_ids == reference[: first + 1]
    assert_clean(llm)


def test_stop_string_finishes_with_stop_and_trims_the_text(llm: LLM, reference: list[int]) -> None:
    full = llm.tokenizer.decode(reference)
    stop = next(full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].strip() == full[i : i + 3])
    params = SamplingParams(temperature=0, max_tokens=24, stop=[stop])
    (result,) = llm.generate([GOOD], params, use_tqdm=False)
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert len(result.token_ids) < 24
    assert result.token_ids == reference[: len(result.token_ids)]
    assert stop in llm.tokenizer.decode(result.token_ids)
    assert_clean(llm)


def test_eos_finishes_with_stop_unless_ignored(small_model: Path, tmp_path: Path) -> None:
    """A copy of the model that declares a token it is known to generate as its EOS."""
    probe = LLM(str(small_model), num_blocks=64, max_model_len=MAX_LEN)
    expected = probe.generate([GOOD], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    tokens = expected[0].token_ids
    eos = tokens[6]
    model = tmp_path / "model"
    shutil.copytree(small_model, model)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model / name).read_text())
        config["eos_token_id"] = eos if name == "config.json" else [eos]
        (model / name).write_text(json.dumps(config))
    llm = LLM(str(model), num_blocks=64, max_model_len=MAX_LEN)
    stopped, ignored = llm.generate(
        [GOOD, GOOD],
        [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)],
        use_tqdm=False,
    )
    assert stopped.finish_reason == "stop" and stopped.token_ids == tokens[: tokens.index(eos) + 1]
    assert ignored.finish_reason == "length" and ignored.token_ids == tokens
    assert_clean(llm)


def test_offline_jsonl_reports_each_bad_line_and_runs_the_good_ones(llm: LLM, reference: list[int]) -> None:
    good = {"prompt_token_ids": GOOD, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    lines = [
        json.dumps({"id": "ok-1", **good}),
        '{"id": "broken", "prompt": ',
        json.dumps({"id": "unknown", **good, "best_of": 3}),
        json.dumps({"id": "empty", "prompt_token_ids": [], "max_tokens": 4}),
        json.dumps({"id": "zero", "prompt_token_ids": GOOD, "max_tokens": 0}),
        json.dumps({"id": "temp", "prompt_token_ids": GOOD, "temperature": -0.5}),
        json.dumps({"id": "top_p", "prompt_token_ids": GOOD, "top_p": 2}),
        json.dumps({"id": "top_k", "prompt_token_ids": GOOD, "top_k": -7}),
        json.dumps({"id": "vocab", "prompt_token_ids": [1, 99999]}),
        json.dumps({"id": "long", "prompt_token_ids": GOOD * 20, "max_tokens": 10}),
        json.dumps({"id": "both", "prompt": "hi", "prompt_token_ids": [1]}),
        json.dumps({"id": "text-ids", "prompt_token_ids": "hello"}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"id": "stop-str", "prompt": "The harbor", "max_tokens": 6, "stop": "zzzz-never"}),
        json.dumps({"id": "ok-2", **good}),
    ]
    records = run_offline(llm, [line + "\n" for line in lines], use_tqdm=False)
    assert len(records) == len(lines) - 1  # the blank line is skipped
    by_id = {r["id"]: r for r in records if r["id"] is not None}
    for rid in ("ok-1", "ok-2"):
        assert by_id[rid]["token_ids"] == reference[:8] and by_id[rid]["finish_reason"] == "length"
        assert by_id[rid]["usage"]["prompt_tokens"] == len(GOOD)
        assert by_id[rid]["usage"]["completion_tokens"] == 8
    assert by_id["ok-2"]["usage"]["cached_tokens"] == 16  # it runs after ok-1, which shares its first block
    expected_errors = {
        "unknown": "unknown key(s): best_of",
        "empty": "the prompt is empty",
        "zero": "max_tokens must be at least 1",
        "temp": "temperature must be a number >= 0",
        "top_p": "top_p must be in (0, 1]",
        "top_k": "top_k must be -1",
        "vocab": "token id 99999 is outside the vocabulary",
        "long": "exceeds the model's context",
        "both": "exactly one of 'prompt' or 'prompt_token_ids'",
        "text-ids": "'prompt_token_ids' must be a list of integers",
    }
    for rid, message in expected_errors.items():
        assert message in by_id[rid]["error"], (rid, by_id[rid])
        assert set(by_id[rid]) == {"id", "error"}
    assert records[1] == {"id": None, "error": records[1]["error"]}
    assert records[1]["error"].startswith("line 2: malformed JSON")
    assert records[12]["error"] == "line 13: expected a JSON object"
    assert by_id["stop-str"]["finish_reason"] == "length" and len(by_id["stop-str"]["token_ids"]) == 6
    assert_clean(llm)
