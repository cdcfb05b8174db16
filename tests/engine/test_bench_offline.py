"""`pdserve bench offline` end to end at a toy size: both engines run and agree token for token."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.bench import offline


def test_bench_offline_runs_both_engines(small_model: Path, capsys: pytest.CaptureFixture[str],
                                         torch_one_thread: None) -> None:
    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    args = parser.parse_args(["--model", str(small_model), "--num-prompts", "3", "--input-len", "5:40",
                              "--output-len", "2:6", "--hf-batch-size", "2"])
    assert offline.run(args) == 0
    out = capsys.readouterr().out
    assert out.count("greedy tokens identical for 3/3 requests") == 2  # one batch of 3, then batches of 2
    assert "output tokens/s" in out and "ratio" in out and "decode roofline" in out
    assert "pure-decode step, batch       1:" in out


def test_bench_offline_refuses_bad_lengths(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    assert offline.run(parser.parse_args(["--input-len", "9:3"])) == 2
    assert "low <= high" in capsys.readouterr().err
