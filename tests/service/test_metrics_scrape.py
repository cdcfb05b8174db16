"""The one scrape path: the router's /metrics carries its own series and every worker's, and promtool accepts it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.proto_gen import generation_pb2 as pb
from tests.service.conftest import RunningServer


def _scrape(server: RunningServer) -> str:
    response = httpx.get(server.http_base + "/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def test_live_scrape_has_worker_series_and_passes_promtool(disagg_server: RunningServer, promtool: Path) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(100, 260))),
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    list(disagg_server.stub().Generate(request, timeout=60))
    time.sleep(2.5)  # two poll rounds: worker stats reach the router about once a second
    text = _scrape(disagg_server)

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    roles = {dict(labels).get("role") for name, labels in samples if name == "pdserve_kv_cache_usage_perc"}
    assert {"prefill", "decode"} <= roles
    workers = {dict(labels)["worker"] for name, labels in samples if name == "pdserve_worker_up"}
    assert {"prefill-0", "decode-0"} <= workers
    assert any(name == "pdserve_prefix_cache_queries_total" and value > 0 for (name, _), value in samples.items())
    # One host: the decode worker maps the prefill worker's shared KV memory, so the KV crossed "shm".
    assert any(name == "pdserve_kv_transfer_seconds_count" and dict(labels).get("transport") == "shm" and value > 0
               for (name, labels), value in samples.items())
    assert any(name == "pdserve_time_to_first_token_seconds_count" and value > 0
               for (name, _), value in samples.items())
    # The tokens after the first came from the decode worker: each stage of their way here was timed.
    stages = {dict(labels)["stage"]: value for (name, labels), value in samples.items()
              if name == "pdserve_token_stage_seconds_count"}
    assert stages.keys() == {"engine_step", "worker_to_router", "router", "router_to_client"}
    assert all(count >= 3 for count in stages.values()), stages

    check = subprocess.run([str(promtool), "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
