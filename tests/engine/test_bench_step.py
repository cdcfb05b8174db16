"""`pdserve bench step` end to end at a toy size: both attention paths, the roofline, a prompt's chunks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import kernels.cpu_attention as cpu_attention
from services.bench import step


def test_bench_step_reports_both_paths_against_the_roofline(small_model: Path, capsys: pytest.CaptureFixture[str],
                                                            torch_one_thread: None) -> None:
    parser = argparse.ArgumentParser()
    step.add_arguments(parser)
    args = parser.parse_args(["--model", str(small_model), "--batch-sizes", "1,3", "--context", "20", "--steps", "2",
                              "--rounds", "2", "--prompt-len", "40", "--max-num-batched-tokens", "64",
                              "--prefill-tokens-with-decodes", "16", "--compare-reference", "--kv-cache-gib", "0.01"])
    assert step.run(args) == 0
    out = capsys.readouterr().out
    assert "batch 1: mean context" in out and "batch 3: mean context" in out
    assert out.count("  in place  median") == 2 and out.count("  reference median") == 2
    assert out.count("x roofline") == 4 and out.count("x copy roofline") == 4
    assert "GFLOP per step; roofline" in out and "GFLOP/s" in out
    assert out.count("a 40-token prompt arriving (token budget 64 per step): 3 step(s)") == 2
    assert cpu_attention.use_native


def test_bench_step_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    step.add_arguments(parser)
    assert step.run(parser.parse_args(["--batch-sizes", "0"])) == 2
    assert "must be positive" in capsys.readouterr().err
