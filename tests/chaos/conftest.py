"""One `pdserve serve` (disagg, 2 prefill + 2 decode workers, real Ray, UCX, gRPC and HTTP) shared by the
chaos scenarios of a module, and a real Prometheus scraping it from before the first scenario on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.env import ENV
from tests.chaos.deployment import LocalDeployment
from tests.chaos.prometheus import Prometheus, scaled_rules
from tests.chaos.workload import Reference
from tests.service.conftest import RunningServer, start_server

# Sized for a small CPU host: --num-blocks and --max-queued-requests keep what the router admits or queues to what
# two cores serve within a request's deadline (with the default queue of 128, the overload scenario's queued
# requests run out their 30 s deadline here instead of being refused); --slo-ttft-ms is a target the suite's
# long prompts miss on this hardware, so that the SLO burn alerts fire. The netns test hosts' routers take SIZING
# after the chart's own arguments.
SIZING = ("--local-prefill-threshold", "0", "--slo-ttft-ms", "20", "--transfer-timeout-s", "5",
          "--num-blocks", "1024", "--max-queued-requests", "8")
SERVE_ARGS = ("--mode", "disagg", "--prefill-workers", "2", "--decode-workers", "2", *SIZING)
# The alert rules' durations (rate windows, `for:`) divided by this: 5m -> 5 s, 1h -> 60 s.
RULE_SPEEDUP = 60.0


@pytest.fixture(scope="module")
def reference() -> Reference:
    from services.modelgen.default_model import default_model_dir

    return Reference.compute(str(default_model_dir()), ENV.home / "chaos")


@pytest.fixture(scope="module")
def chaos_server(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> Iterator[RunningServer]:
    from services.modelgen.default_model import default_model_dir

    server = start_server(tmp_path_factory.mktemp("chaos"), str(default_model_dir()), *SERVE_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, chaos_server: RunningServer) -> Iterator[Prometheus]:
    target = chaos_server.http_base.removeprefix("http://")
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), [target], scaled_rules(RULE_SPEEDUP))
    yield prom
    prom.stop()


@pytest.fixture(scope="module")
def deployment(chaos_server: RunningServer, prometheus: Prometheus) -> LocalDeployment:
    return LocalDeployment(chaos_server)


def serve_log(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]
