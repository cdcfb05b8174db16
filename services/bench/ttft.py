"""TTFT breakdown of a long prompt, disaggregated against colocated, measured side by side in one run.

Both servers give the prompt's compute the same threads (one worker core), so the difference is
what the hand-off costs. The breakdown comes from the router's own stage histogram
(pdserve_request_stage_seconds), read from /metrics before and after the requests:

    queue     arrival → dispatched (decode reservation)
    prefill   dispatched → prefill done (prefill worker queue + compute)
    transfer  prefill done → KV delivered (transfer not hidden behind compute)
    admission KV delivered → first decode step (after the first token: it delays the second)
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

from services.bench.launch import LaunchedServer, launch
from services.proto_gen import generation_pb2 as pb
from services.proto_gen import generation_pb2_grpc as pb_grpc

STAGES = {"queue": "queue", "prefill": "prefill", "transfer": "transfer", "decode_queue": "admission"}


@dataclass
class TTFTRun:
    mode: str
    ttft_s: list[float] = field(default_factory=list)
    stages_s: dict[str, float] = field(default_factory=dict)  # mean seconds per stage

    @property
    def median_ttft_s(self) -> float:
        return statistics.median(self.ttft_s)


def _stage_sums(server: LaunchedServer) -> dict[str, tuple[float, float]]:
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
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


def _ttft(stub: pb_grpc.GenerationStub, ids: list[int]) -> float:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    )
    start = time.perf_counter()
    ttft = 0.0
    for response in stub.Generate(request, timeout=300):
        if response.HasField("chunk") and response.chunk.token_ids and not ttft:
            ttft = time.perf_counter() - start
    return ttft


def measure(server: LaunchedServer, mode: str, prompt_len: int, repeats: int, seed: int) -> TTFTRun:
    rng = random.Random(seed)
    run = TTFTRun(mode)
    with grpc.insecure_channel(server.grpc_url.removeprefix("grpc://")) as channel:
        stub = pb_grpc.GenerationStub(channel)
        _ttft(stub, [rng.randrange(10, 7000) for _ in range(prompt_len)])  # warm-up: first-use costs
        before = _stage_sums(server)
        for _ in range(repeats):  # fresh random prompts: no prefix-cache hits
            run.ttft_s.append(_ttft(stub, [rng.randrange(10, 7000) for _ in range(prompt_len)]))
        after = _stage_sums(server)
    for stage, label in STAGES.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        total1, count1 = after.get(stage, (0.0, 0.0))
        if count1 > count0:
            run.stages_s[label] = (total1 - total0) / (count1 - count0)
    return run


def run_breakdown(model: str | None, prompt_len: int = 1000, repeats: int = 5, seed: int = 0) -> list[TTFTRun]:
    model_args = ["--model", model] if model else []
    common = [*model_args, "--cpus-per-worker", "1", "--local-prefill-threshold", "0"]
    runs = []
    with tempfile.TemporaryDirectory() as logs:
        for mode, args in (("colocated", ["--mode", "colocated"]), ("disagg", ["--mode", "disagg"])):
            with launch(Path(logs), *common, *args) as server:
                runs.append(measure(server, mode, prompt_len, repeats, seed))
    return runs


def format_breakdown(runs: list[TTFTRun], prompt_len: int) -> str:
    by_mode = {r.mode: r for r in runs}
    lines = [f"TTFT breakdown, {prompt_len}-token prompt (median TTFT; mean ms per stage)"]
    lines.append(f"{'mode':<10} {'TTFT ms':>9} " + " ".join(f"{label:>10}" for label in STAGES.values()))
    for r in runs:
        cells = " ".join(f"{r.stages_s.get(label, 0.0) * 1e3:>10.1f}" for label in STAGES.values())
        lines.append(f"{r.mode:<10} {r.median_ttft_s * 1e3:>9.1f} {cells}")
    if "disagg" in by_mode and "colocated" in by_mode:
        ratio = by_mode["disagg"].median_ttft_s / by_mode["colocated"].median_ttft_s
        lines.append(f"disagg / colocated TTFT: {ratio:.3f} (target <= 1.15)")
    return "\n".join(lines)
