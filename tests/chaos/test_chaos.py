"""The chaos suite, bounded for `make test`: each scenario against one live `pdserve serve` (disagg 2+2, real
Ray, UCX, gRPC and HTTP), its invariants checked after it (tests/chaos/invariants.py), while a real Prometheus
scrapes the router with deploy/prometheus/alerts.yml loaded (durations scaled, tests/chaos/prometheus.py).

The scenarios run in the order written; the last one stops the server. `make chaos` runs them larger
(tests/chaos/soak.py).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos import scenarios
from tests.chaos.deployment import LocalDeployment
from tests.chaos.fuzz import fuzz
from tests.chaos.invariants import ScenarioResult, kinds_line
from tests.chaos.prometheus import Prometheus, dashboard_queries
from tests.chaos.rogue import rogue_kv_peer
from tests.chaos.workload import Reference

SCALE = scenarios.Scale(in_flight=8)
pytestmark = pytest.mark.timeout(300)


def _check(result: ScenarioResult, deployment: LocalDeployment) -> None:
    print(f"\n{result.name}: {kinds_line(result)}; leaked {result.leaked_blocks}; recovery {result.recovery_s}")
    assert not result.violations(), "\n".join(result.violations()) + "\n" + deployment.server.log()[-3000:]


def test_prefill_worker_killed_with_long_prompts_in_flight(deployment: LocalDeployment, reference: Reference) -> None:
    _check(asyncio.run(scenarios.prefill_kill(deployment, reference, SCALE)), deployment)


def test_decode_worker_killed_mid_stream_streams_migrate(deployment: LocalDeployment, reference: Reference) -> None:
    _check(asyncio.run(scenarios.decode_kill(deployment, reference, SCALE)), deployment)


def test_client_disconnects_mid_stream(deployment: LocalDeployment, reference: Reference) -> None:
    _check(asyncio.run(scenarios.client_disconnect(deployment, reference, SCALE)), deployment)


def test_cancel_before_first_token_stops_the_prefill(deployment: LocalDeployment, reference: Reference) -> None:
    _check(asyncio.run(scenarios.cancel_before_first_token(deployment, reference, SCALE)), deployment)


def test_abort_from_another_connection_is_refused(deployment: LocalDeployment, reference: Reference) -> None:
    _check(asyncio.run(scenarios.abort_from_another_connection(deployment, reference, SCALE)), deployment)


def test_restarted_workers_are_not_reached_at_stale_endpoints(deployment: LocalDeployment,
                                                               reference: Reference) -> None:
    _check(asyncio.run(scenarios.stale_peer(deployment, reference, SCALE)), deployment)


def test_a_rogue_peer_on_the_kv_port_is_refused(deployment: LocalDeployment, reference: Reference) -> None:
    from services.modelgen.default_model import default_model_dir

    _check(asyncio.run(rogue_kv_peer(deployment, reference, str(default_model_dir()))), deployment)


def test_fuzzed_input_gets_clear_errors(deployment: LocalDeployment) -> None:
    _check(fuzz(deployment, examples=15), deployment)


def test_overload_is_refused_not_queued(deployment: LocalDeployment, reference: Reference) -> None:
    _check(asyncio.run(scenarios.overload(deployment, reference, SCALE)), deployment)


def test_stalled_prefill_pool_and_the_alerts_it_fires(deployment: LocalDeployment, reference: Reference,
                                                      prometheus: Prometheus) -> None:
    assert prometheus.targets_up(), prometheus.api("targets")
    since = time.time()
    _check(asyncio.run(scenarios.prefill_pool_stall(deployment, reference, SCALE)), deployment)
    silent = [a for a in ("PdserveWorkerDown", "PdserveKVTransferFailures", "PdserveTTFTSLOBurnFast")
              if not prometheus.wait_fired(a, timeout_s=20, since=since)]
    assert not silent, f"alerts that never fired: {silent}; firing: {prometheus.query('ALERTS')}"


def test_overload_alert_fired(prometheus: Prometheus) -> None:
    """PdserveOverloaded fired during the overload scenario (it needs the router's admission control)."""
    assert prometheus.wait_fired("PdserveOverloaded", timeout_s=15), prometheus.query("ALERTS")


def test_every_dashboard_query_returns_data(prometheus: Prometheus) -> None:
    empty = [f"{board} / {panel}: {expr}" for board, panel, expr in dashboard_queries()
             if not prometheus.query(expr)]
    assert not empty, "queries with no data:\n" + "\n".join(empty)


def test_router_sigterm_drains(deployment: LocalDeployment, reference: Reference, prometheus: Prometheus) -> None:
    """Last: it stops the server. Prometheus then sees the router go (PdserveRouterDown)."""
    since = time.time()
    result = asyncio.run(scenarios.router_sigterm(deployment, reference, SCALE, deployment.server.process.terminate))
    deployment.server.process.wait(60)
    _check(result, deployment)
    assert prometheus.wait_fired("PdserveRouterDown", timeout_s=20, since=since)
