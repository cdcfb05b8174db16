"""`pdserve bench serve` against a live `pdserve serve` (1 prefill + 1 decode): every dataset, both targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from services.cli import main as cli_main
from tests.service.conftest import RunningServer


@pytest.fixture(autouse=True)
def _keep_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """services.cli.main(argv) sets sys.argv; put it back after each test."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))


def _bench(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "result.json"
    code = cli_main(["bench", "serve", "--disable-tqdm", "--result-json", str(out), *args])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return code, json.loads(out.read_text()), printed.out


def _check_run(run: dict[str, Any], n: int, exact_outputs: bool = True) -> None:
    s = run["summary"]
    assert s["num_requests"] == n and s["completed"] == n and s["failed"] == 0, s["errors"]
    assert len(run["requests"]) == n
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[key]
        assert d["count"] > 0, key
        assert 0 <= d["median"] <= d["p90"] <= d["p99"], (key, d)
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    assert s["total_token_throughput"] > s["output_throughput"]
    if s["goodput"] is not None:
        assert 0 <= s["goodput"] <= s["request_throughput"] + 1e-9
        assert 0 <= s["slo_attainment_pct"] <= 100
    for r in run["requests"]:
        assert r["success"] and r["error"] is None
        assert r["prompt_tokens"] > 0
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        if exact_outputs:  # ignore_eos: the reply is exactly as long as asked
            assert r["output_tokens"] == r["expected_output_tokens"], r
        assert len(r["itl_s"]) <= r["output_tokens"] - 1


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_random_dataset(disagg_server: RunningServer, serve_model_dir: str, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str], scheme: str) -> None:
    target = f"grpc://{disagg_server.grpc_target}" if scheme == "grpc" else disagg_server.http_base
    _, result, printed = _bench(capsys, tmp_path, "--target", target, "--tokenizer", serve_model_dir,
                                "--num-requests", "6", "--input-len", "16:48", "--output-len", "4:8",
                                "--max-concurrency", "3", "--goodput", "ttft:5000", "tpot:1000")
    (run,) = result["runs"]
    _check_run(run, 6)
    assert run["request_rate"] == "inf" and run["max_concurrency"] == 3
    for r in run["requests"]:  # token-id prompts: the server counts exactly the tokens sent
        assert 16 <= r["prompt_tokens"] <= 48
    assert "Serving Benchmark Result" in printed and "Request goodput (req/s)" in printed
    # The per-token path comes from the router's /metrics: an http target's own, or one named for grpc.
    if scheme == "http":
        assert set(run["token_stages"]) == {"engine_step", "worker_to_router", "router", "router_to_client"}
        assert all(seconds is not None and seconds >= 0 for seconds in run["token_stages"].values())
        assert "Per-token path, median (ms)" in printed
    else:
        assert run["token_stages"] == {}


def test_shared_prefix_grpc(disagg_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, result, _ = _bench(capsys, tmp_path, "--target", f"grpc://{disagg_server.grpc_target}",
                          "--dataset", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "3",
                          "--system-prompt-len", "64", "--question-len", "8", "--output-len", "4",
                          "--request-rate", "20")
    (run,) = result["runs"]
    _check_run(run, 6)
    assert {r["prompt_tokens"] for r in run["requests"]} == {72}


def test_multi_turn_grpc_carries_replies(disagg_server: RunningServer, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _, result, _ = _bench(capsys, tmp_path, "--target", f"grpc://{disagg_server.grpc_target}",
                          "--dataset", "multi-turn", "--num-conversations", "2", "--turns", "3",
                          "--input-len", "10", "--output-len", "5", "--max-concurrency", "2")
    (run,) = result["runs"]
    _check_run(run, 6)
    for conv in (0, 1):
        turns = sorted((r for r in run["requests"] if r["conversation"] == conv), key=lambda r: r["turn"])
        # each turn is the whole history: 10 user tokens, then 5 reply tokens and 10 more per later turn
        assert [r["prompt_tokens"] for r in turns] == [10, 25, 40]
        assert turns[1]["start_s"] >= turns[0]["start_s"] + turns[0]["e2e_s"] - 1e-6


def test_multi_turn_http_chat(disagg_server: RunningServer, serve_model_dir: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    _, result, _ = _bench(capsys, tmp_path, "--target", disagg_server.http_base, "--endpoint", "chat",
                          "--tokenizer", serve_model_dir, "--dataset", "multi-turn", "--num-conversations", "2",
                          "--turns", "2", "--input-len", "12", "--output-len", "6")
    (run,) = result["runs"]
    _check_run(run, 4)
    for conv in (0, 1):
        first, second = sorted((r for r in run["requests"] if r["conversation"] == conv), key=lambda r: r["turn"])
        assert second["prompt_tokens"] > first["prompt_tokens"] + 6


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_sharegpt(disagg_server: RunningServer, serve_model_dir: str, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str], scheme: str) -> None:
    data = [{"conversations": [{"from": "human", "value": f"Question {i}: how do harbours keep boats safe?"},
                               {"from": "gpt", "value": "With walls, tides and care. " * (1 + i % 3)}]}
            for i in range(8)]
    data.append({"conversations": [{"from": "human", "value": "word " * 5000}, {"from": "gpt", "value": "no"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    target = f"grpc://{disagg_server.grpc_target}" if scheme == "grpc" else disagg_server.http_base
    _, result, _ = _bench(capsys, tmp_path, "--target", target, "--tokenizer", serve_model_dir,
                          "--dataset", "sharegpt", "--dataset-path", str(path), "--num-requests", "20")
    (run,) = result["runs"]
    _check_run(run, 8)  # the 5000-word prompt does not fit the context and is filtered out
    assert len({r["expected_output_tokens"] for r in run["requests"]}) == 3


def test_sweep_writes_png(disagg_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "sweep.png"
    _, result, printed = _bench(capsys, tmp_path, "--target", f"grpc://{disagg_server.grpc_target}",
                                "--num-requests", "4", "--input-len", "16", "--output-len", "4",
                                "--request-rate", "5,inf", "--goodput", "ttft:5000", "--plot", str(png))
    assert [run["request_rate"] for run in result["runs"]] == [5, "inf"]
    assert [run["seed"] for run in result["runs"]] == [0, 1]  # fresh prompts per rate: no prefix-cache carry-over
    for run in result["runs"]:
        _check_run(run, 4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "TTFT p50" in printed  # the sweep table


def test_bad_targets_and_arguments_fail_clearly(disagg_server: RunningServer, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from services.bench.launch import free_port

    cases = [
        (["--target", f"grpc://127.0.0.1:{free_port()}"], "no pdserve gRPC server"),
        (["--target", "ftp://127.0.0.1:1"], "expected grpc://HOST:PORT or http://HOST:PORT"),
        (["--target", f"grpc://{disagg_server.grpc_target}", "--request-rate", "0"], "positive"),
        (["--target", f"grpc://{disagg_server.grpc_target}", "--goodput", "latency:5"], "bad --goodput"),
        (["--target", f"grpc://{disagg_server.grpc_target}", "--input-len", "5000"], "exceed the context"),
        (["--target", f"grpc://{disagg_server.grpc_target}", "--dataset", "sharegpt",
          "--dataset-path", str(tmp_path / "missing.json"), "--tokenizer", str(tmp_path)], "no tokenizer.json"),
        (["--target", disagg_server.http_base, "--model", "no-such-model", "--num-requests", "1"],
         "test request"),
    ]
    for args, message in cases:
        code = cli_main(["bench", "serve", "--disable-tqdm", *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in err, (args, err)
