"""`pdserve bench compare` without servers: goodput under the two SLOs, the tables, the greedy comparison, and
the llama.cpp command lines (converter and server)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.bench import llama_server, peers
from services.bench import serve as bench_serve
from services.bench.load import LoadConfig, RunResult
from services.bench.metrics import RequestRecord, summarize
from services.bench.peers_report import (
    SLO_A,
    SLO_B,
    PeerResult,
    attainment,
    best_goodput,
    goodputs,
    markdown,
    offline_table,
    results_json,
    serving_table,
    single_table,
    stages_table,
    targets,
    tpot_p50_at,
)


def _record(i: int, ttft_s: float, tpot_s: float, tokens: int = 11, success: bool = True) -> RequestRecord:
    e2e = ttft_s + tpot_s * (tokens - 1)
    return RequestRecord(i, i, 0, 0.0, 0.0, success, 100, tokens, tokens, ttft_s, e2e, [tpot_s] * (tokens - 1))


def _run(rate: float, records: list[RequestRecord], duration_s: float = 10.0) -> tuple[RunResult, object]:
    run = RunResult(LoadConfig(rate), duration_s, records)
    return run, summarize(records, duration_s, SLO_A)


def _sweep() -> list:
    # rate 1: 4 requests at TPOT 20 ms (meet A and B); rate 2: 2 at 100 ms (A only), 1 with TTFT 4 s (neither),
    # one failed.
    return [
        _run(1.0, [_record(i, 0.1, 0.020) for i in range(4)]),
        _run(2.0, [_record(0, 0.1, 0.100), _record(1, 0.2, 0.100), _record(2, 4.0, 0.010),
                   _record(3, 0.1, 0.01, success=False)], duration_s=2.0),
    ]


def test_goodput_under_both_slos_from_the_same_records() -> None:
    sweep = _sweep()
    assert goodputs(sweep, SLO_A) == [0.4, 1.0]
    assert goodputs(sweep, SLO_B) == [0.4, 0.0]
    assert best_goodput(sweep, SLO_A) == 1.0
    assert best_goodput(sweep, SLO_B) == 0.4
    assert best_goodput([], SLO_A) is None
    assert attainment(sweep, SLO_B) == [(1.0, 100.0), (2.0, 0.0)]
    assert abs(tpot_p50_at(sweep, 1.0) - 20.0) < 1e-6  # type: ignore[operator]
    assert tpot_p50_at(sweep, 4.0) is None


def _results() -> list[PeerResult]:
    llama = PeerResult("llama-server", "llama-server -np 16", sweep=_sweep(),
                       single=[_run(float("inf"), [_record(0, 0.06, 0.003, tokens=128)])],
                       offline_tokens_per_s=200.0, offline_seconds=10.0)
    broken = PeerResult("pdserve disagg 1+1", "pdserve serve --mode disagg", errors=["did not start: boom"])
    engine = PeerResult("pdserve offline engine", "LLM", offline_tokens_per_s=300.0, offline_seconds=6.0,
                        server=False)
    return [llama, broken, engine]


def test_tables_have_a_row_per_server_and_leave_missing_figures_blank() -> None:
    results = _results()
    serving = serving_table(results, [1.0, 2.0])
    assert serving[2] == ("| llama-server | 1.00 req/s | 0.40 req/s | 20.0 ms | 0.40, 1.00 |")
    assert serving[3] == "| pdserve disagg 1+1 | n/a | n/a | n/a | n/a |"
    assert len(serving) == 4  # the offline engine is no server
    single = single_table(results)
    assert single[2] == "| llama-server | 3.0 ms | 3.0 ms | 60 ms | 1 |"
    assert single[3] == "| pdserve disagg 1+1 | n/a | n/a | n/a | 0 |"
    offline = offline_table(results)
    assert offline[2:] == ["| llama-server | 200.0 | 10.0 | 1.00x |",
                           "| pdserve offline engine | 300.0 | 6.0 | 1.50x |"]


def test_markdown_and_json_carry_every_part() -> None:
    config = {"rates": [1.0, 2.0], "input_len": "256:1024", "output_len": "32:128", "num_requests": 4,
              "single_input": 256, "single_output": 128, "single_requests": 1, "offline_prompts": 32,
              "offline_input": "64:512", "offline_output": "16:256"}
    text = markdown(_results(), config, ["a note"])
    assert "| llama-server | 1.00 req/s |" in text and "a note" in text
    assert "- pdserve disagg 1+1 failed: did not start: boom" in text
    payload = results_json(_results(), config, {"check": []})
    json.dumps(payload, allow_nan=False)
    assert payload["peers"]["llama-server"]["goodput_slo_b"] == [0.4, 0.0]
    assert payload["peers"]["llama-server"]["single"][0]["request_rate"] == "inf"


def test_the_targets_and_the_per_token_path_come_from_the_same_run() -> None:
    import dataclasses

    stages = {"engine_step": 0.008, "worker_to_router": 0.0008, "router": 0.0001, "router_to_client": 0.0003}
    disagg_run, summary = _run(1.0, [_record(i, 0.1, 0.010) for i in range(4)])
    disagg = PeerResult("pdserve disagg 1+1", "d", sweep=[(dataclasses.replace(disagg_run, token_stages=stages),
                                                          summary)])
    colocated = PeerResult("pdserve colocated", "c", sweep=[_run(1.0, [
        _record(0, 0.1, 0.020), _record(1, 0.1, 0.020), _record(2, 0.1, 0.060), _record(3, 0.1, 0.060)])])
    llama, _, engine = _results()
    engine.decode_step_ms = 8.0
    lines = targets([llama, colocated, disagg, engine], [1.0, 2.0])
    assert lines[0] == ("- goodput under A (TTFT <= 3000 ms, TPOT <= 150 ms): pdserve colocated 0.40 req/s, "
                        "llama-server 1.00 req/s: 0.40x (target 1.5x)")
    assert "pdserve disagg 1+1 0.40 req/s, llama-server 0.40 req/s: 1.00x" in lines[1]
    assert lines[2] == "- disagg over colocated under B: 0.40 req/s against 0.20 req/s: 2.00x (target 1.3x)"
    disagg_line = next(line for line in lines if line.startswith("- pdserve disagg 1+1, TPOT"))
    assert "10.0 ms; against its engine step as served in that run, 8.0 ms: 1.25x" in disagg_line
    assert "offline batch-1 step on one thread, 8.00 ms: 1.25x" in disagg_line
    assert lines[-1] == "- offline: 1.50x of llama-server (target 1.5x)"
    table = stages_table([llama, disagg])
    assert table[2:] == ["| pdserve disagg 1+1 | 1 | 8.00 ms | 0.80 ms | 0.10 ms | 0.30 ms | 1.20 ms |"]


def test_greedy_comparison_counts_identical_requests_and_the_first_divergence() -> None:
    ours = peers.GreedyTokens(check=[[1, 2, 3], [4, 5, 6]], offline=[[1, 2], [3, 4, 5, 6]])
    theirs = peers.GreedyTokens(check=[[1, 2, 3], [4, 9, 6]], offline=[[1, 2], [3, 4, 0, 6]])
    record, lines = peers.compare_greedy(ours, theirs)
    assert [c["same"] for c in record["check"]] == [True, False]
    assert record["check"][1]["common_prefix"] == 1
    assert (record["offline_identical"], record["offline_tokens_before_divergence"], record["offline_tokens"]) == (
        1, 4, 6)
    assert "identical for 1/2 requests" in lines[0]


def test_serve_arguments_for_the_sweep_and_the_one_at_a_time_run(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    peers.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path)])
    sweep = peers._serve_args(args, "http://127.0.0.1:1", single=False)
    assert (sweep.input_len, sweep.output_len, sweep.num_requests) == ("256:1024", "32:128", 32)
    assert sweep.request_rate == "1,2,3,4,5,6,8,10,12,16"
    assert sweep.goodput == ["ttft:3000", "tpot:150"] and sweep.max_concurrency is None
    assert sweep.min_duration_s == 8.0
    assert [bench_serve.requests_for_rate(sweep, r).num_requests for r in (1, 4, 8, 16)] == [32, 32, 64, 128]
    single = peers._serve_args(args, "http://127.0.0.1:1", single=True)
    assert (single.input_len, single.output_len, single.request_rate, single.max_concurrency) == ("256", "128",
                                                                                                  "inf", 1)
    assert single.tokenizer == str(tmp_path) and single.dataset == "random"


def test_llama_cpp_command_lines(tmp_path: Path) -> None:
    llama = llama_server.LlamaCpp(tmp_path / "0.3.36")
    model = tmp_path / "tiny-seed0"
    out = llama.gguf_path(model)
    assert out == tmp_path / "0.3.36" / "models" / "tiny-seed0-f32.gguf"
    assert llama_server.convert_command(llama, model, out) == [
        sys.executable, "-m", "services.bench.llama_server", "convert", str(tmp_path / "0.3.36" / "src"),
        str(model), "--outfile", str(out), "--outtype", "f32"]
    argv = llama_server.server_args(llama, out, 8080, "tiny-seed0")
    assert argv[0] == str(tmp_path / "0.3.36" / "bin" / "llama-server")
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert (flags["-np"], flags["-c"], flags["-t"], flags["--port"]) == ("16", "32768", "2", "8080")
    small = llama_server.server_args(llama, out, 1, "m", slots=4, threads=1, ctx_per_slot=1024)
    assert small[small.index("-c") + 1] == "4096" and small[small.index("-t") + 1] == "1"
