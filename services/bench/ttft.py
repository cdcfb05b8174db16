"""TTFT breakdown of a long prompt, disaggregated against colocated, and TPOT, measured side by side in one run.

Both servers give the prompt's compute the same threads (one worker core), so the difference is
what the hand-off costs. The breakdown comes from the router's own stage histogram
(pdserve_request_stage_seconds), read from /metrics before and after the requests:

    queue     arrival → dispatched (decode reservation)
    prefill   dispatched → prefill done (prefill worker queue + compute)
    transfer  prefill done → KV delivered (transfer not hidden behind compute)
    admission KV delivered → first decode step (after the first token: it delays the second)

TPOT is the client's: over a few requests streamed one at a time with a short prompt, the time from
the first token to the last over the tokens after the first; the median request's. It is the per-token
cost of the path from the decode worker through the router (a Ray driver) to the client.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.bench.launch import launch
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc

STAGES = {"queue": "queue", "prefill": "prefill", "transfer": "transfer", "decode_queue": "admission"}
TPOT_REQUESTS = 5
TPOT_TOKENS = 33  # 32 intervals after the first token


@dataclass(frozen=True)
class Server:
    """Where a pdserve router answers: gRPC "host:port" and the HTTP base URL (for /metrics)."""

    grpc_target: str
    http_base: str


@dataclass
class TTFTRun:
    mode: str
    ttft_s: list[float] = field(default_factory=list)
    stages_s: dict[str, float] = field(default_factory=dict)  # mean seconds per stage
    tpot_s: list[float] = field(default_factory=list)  # one per streamed request

    @property
    def median_ttft_s(self) -> float:
        return statistics.median(self.ttft_s)

    @property
    def median_tpot_s(self) -> float:
        return statistics.median(self.tpot_s) if self.tpot_s else float("nan")


def _stage_sums(server: Server) -> dict[str, tuple[float, float]]:
    text = httpx.get(f"{server.http_base}/metrics", timeout=10).text
    sums: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "pdserve_request_stage_seconds":
            continue
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            total, count = sums.get(stage, (0.0, 0.0))
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
            sums[stage] = (total, count)
    return sums


def _stream(stub: pb_grpc.GenerationStub, ids: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """(seconds since the request was sent, tokens) of every chunk of a streamed request."""
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    return [
        (time.perf_counter() - start, len(r.chunk.token_ids))
        for r in stub.Generate(request, timeout=300)
        if r.HasField("chunk") and r.chunk.token_ids
    ]


def _tpot(chunks: list[tuple[float, int]]) -> float:
    """Seconds per token after the first chunk's."""
    later = sum(n for _, n in chunks[1:])
    return (chunks[-1][0] - chunks[0][0]) / later if later else float("nan")


def measure(server: Server, mode: str, prompt_len: int, repeats: int, seed: int) -> TTFTRun:
    rng = random.Random(seed)
    run = TTFTRun(mode)

    def prompt(n: int) -> list[int]:  # fresh random prompts: no prefix-cache hits
        return [rng.randrange(10, 7000) for _ in range(n)]

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        _stream(stub, prompt(prompt_len), 2)  # warm-up: first-use costs
        before = _stage_sums(server)
        for _ in range(repeats):
            run.ttft_s.append(_stream(stub, prompt(prompt_len), 2)[0][0])
        after = _stage_sums(server)
        for _ in range(TPOT_REQUESTS):
            run.tpot_s.append(_tpot(_stream(stub, prompt(16), TPOT_TOKENS)))
    for stage, label in STAGES.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        total1, count1 = after.get(stage, (0.0, 0.0))
        if count1 > count0:
            run.stages_s[label] = (total1 - total0) / (count1 - count0)
    return run


def run_breakdown(model: str | None, prompt_len: int = 1000, repeats: int = 5, seed: int = 0) -> list[TTFTRun]:
    """Colocated, then disaggregated, each a `pdserve serve` on this host with one core per worker."""
    model_args = ["--model", model] if model else []
    common = [*model_args, "--cpus-per-worker", "1", "--local-prefill-threshold", "0"]
    runs = []
    with tempfile.TemporaryDirectory() as logs:
        for mode, args in (("colocated", ["--mode", "colocated"]), ("disagg", ["--mode", "disagg"])):
            with launch(Path(logs), *common, *args) as launched:
                server = Server(launched.grpc_url.removeprefix("grpc://"), launched.http_url)
                runs.append(measure(server, mode, prompt_len, repeats, seed))
    return runs


def format_breakdown(runs: list[TTFTRun], prompt_len: int) -> str:
    by_mode = {r.mode: r for r in runs}
    lines = [f"TTFT breakdown, {prompt_len}-token prompt (median TTFT; mean ms per stage); TPOT: median of "
             f"{TPOT_REQUESTS} requests of {TPOT_TOKENS} tokens streamed one at a time"]
    width = max(10, *(len(r.mode) for r in runs))
    labels = " ".join(f"{label:>10}" for label in STAGES.values())
    lines.append(f"{'mode':<{width}} {'TTFT ms':>9} {labels} {'TPOT ms':>8}")
    for r in runs:
        cells = " ".join(f"{r.stages_s.get(label, 0.0) * 1e3:>10.1f}" for label in STAGES.values())
        lines.append(f"{r.mode:<{width}} {r.median_ttft_s * 1e3:>9.1f} {cells} {r.median_tpot_s * 1e3:>8.2f}")
    colocated = by_mode.get("colocated")
    for r in runs:
        if colocated is not None and r is not colocated:
            ttft = r.median_ttft_s / colocated.median_ttft_s
            tpot = r.median_tpot_s / colocated.median_tpot_s
            target = " (target <= 1.15)" if r.mode == "disagg" else ""
            lines.append(f"{r.mode} / colocated: TTFT {ttft:.3f}{target}, TPOT {tpot:.3f}")
    return "\n".join(lines)
