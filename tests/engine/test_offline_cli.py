"""The real `pdserve offline` command, run as a subprocess on a JSONL file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams

PDSERVE = Path(sys.executable).parent / "pdserve"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two shared cores: one thread is faster for this model


def pdserve(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PDSERVE), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def test_offline_batch_with_bad_lines(small_model: Path, tmp_path: Path, torch_one_thread: None) -> None:
    ids = [11, 22, 33, 44, 55, 66, 77, 88, 99]
    requests = [
        {"id": "text", "prompt": "The harbor town woke early.", "max_tokens": 12, "temperature": 0, "ignore_eos": True},
        '{"id": "truncated", ',
        {"id": "ids", "prompt_token_ids": ids, "max_tokens": 10, "temperature": 0, "ignore_eos": True},
        {"id": "extra", "prompt_token_ids": ids, "beam_width": 4},
        {"prompt_token_ids": [9999999]},
        {"id": "sampled", "prompt_token_ids": ids, "max_tokens": 5, "temperature": 0.8, "seed": 3, "ignore_eos": True},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests))
    out = tmp_path / "out.jsonl"
    proc = pdserve("offline", "--model", small_model, "--input", source, "--output", out, "--max-num-seqs", "8")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["text", None, "ids", "extra", 5, "sampled"]

    llm = LLM(str(small_model), num_blocks=128)
    greedy_text, greedy_ids, sampled = llm.generate(
        ["The harbor town woke early.", ids, ids],
        [
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
            SamplingParams(temperature=0.8, max_tokens=5, seed=3, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    text, truncated, by_ids, extra, vocab, seeded = records
    assert text["token_ids"] == greedy_text.token_ids and text["text"] == greedy_text.text
    assert text["finish_reason"] == "length"
    assert text["usage"] == {"prompt_tokens": len(greedy_text.prompt_token_ids), "completion_tokens": 12,
                             "cached_tokens": 0}
    assert by_ids["token_ids"] == greedy_ids.token_ids and by_ids["usage"]["prompt_tokens"] == len(ids)
    assert seeded["token_ids"] == sampled.token_ids
    assert truncated["error"].startswith("line 2: malformed JSON")
    assert extra == {"id": "extra", "error": "line 4: unknown key(s): beam_width"}
    assert "token id 9999999 is outside the vocabulary" in vocab["error"]


def test_missing_input_file_is_a_clear_error(small_model: Path, tmp_path: Path) -> None:
    proc = pdserve("offline", "--model", small_model, "--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.startswith("pdserve offline: error:") and "nope.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("broken", ["no-config", "not-a-model-type"])
def test_a_directory_that_is_not_a_model_is_a_clear_error(tmp_path: Path, broken: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    if broken == "not-a-model-type":
        (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt_token_ids": [1, 2, 3]}\n')
    proc = pdserve("offline", "--model", model, "--input", source, "--output", tmp_path / "out.jsonl")
    assert proc.returncode == 2
    assert proc.stderr.startswith("pdserve offline: error:")
    assert ("no config.json" if broken == "no-config" else "'gpt2'") in proc.stderr
    assert "Traceback" not in proc.stderr
