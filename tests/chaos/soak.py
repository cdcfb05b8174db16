"""`make chaos`: every scenario at full size, on one host and (as root) on the netns test hosts, with a real
Prometheus scraping the one-host router; prints the table and writes OUT/chaos.md and OUT/chaos.json.

Both topologies have two prefill and two decode workers, so that a killed decode worker's streams move to
another one and a killed prefill worker's prompts are prefilled again on another one. Across hosts: the Ray head
and router on a, prefill on b and f, decode on c and e, the second router on d (tests/multihost/cluster.py);
the KV channel breaks strike b's network, and the router SIGTERM strikes d's router while a's serves on.

    python -m tests.chaos.soak --out bench/results/chaos [--skip-multihost]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from services.env import ENV
from tests.chaos import scenarios
from tests.chaos.client import Client, Outcome
from tests.chaos.conftest import RULE_SPEEDUP, SERVE_ARGS, SIZING
from tests.chaos.deployment import ClusterDeployment, Deployment, LocalDeployment
from tests.chaos.fuzz import fuzz
from tests.chaos.invariants import ScenarioResult, worker_names
from tests.chaos.prometheus import ALERTS, Prometheus, dashboard_queries, scaled_rules
from tests.chaos.report import rows, table, write
from tests.chaos.rogue import rogue_kv_peer
from tests.chaos.workload import Reference, Req, prompts

if TYPE_CHECKING:
    from tests.multihost.cluster import Cluster

ALERTS_EXPECTED = ("PdserveWorkerDown", "PdserveKVTransferFailures", "PdserveTTFTSLOBurnFast", "PdserveOverloaded",
                   "PdserveRouterDown")


async def kv_channel_break(dep: ClusterDeployment, ref: Reference, scale: scenarios.Scale, how: str,
                           fault_s: float) -> ScenarioResult:
    """Breaks the network of the prefill host (b) for `fault_s` while requests arrive: `how` is "down" (ip link
    set down on its veth) or "throttle" (a tbf qdisc: 4 Mbit/s, packets queued over 100 ms dropped; this
    kernel has no netem). Hand-offs over it fail or slow down; every request completes exactly (recompute) or
    fails clearly, and the service is whole again after."""
    host = dep.cluster.net.hosts["b"]
    label = "ip link down" if how == "down" else "tbf 4 Mbit/s"
    result = scenarios.ScenarioResult(f"KV channel: prefill host {label} {fault_s:g} s", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        workers = worker_names(await client.load(False))
        ps = prompts("kv")
        tasks: list[asyncio.Task[Outcome]] = []
        tbf = ["tc", "qdisc", "add", "dev", host.veth, "root", "tbf", "rate", "4mbit", "burst", "32kbit",
               "latency", "100ms"]
        if how == "down":
            host.set_link(False)
        else:
            subprocess.run(host.command(tbf), check=True)
        try:
            stop_at = time.monotonic() + fault_s
            while time.monotonic() < stop_at:
                i = len(tasks)
                tasks.append(asyncio.create_task(client.send(Req(ps[i % len(ps)], 16, "grpc" if i % 2 else "http",
                                                                 scale.deadline_s))))
                await asyncio.sleep(0.5)
        finally:
            if how == "down":
                host.set_link(True)
            else:
                subprocess.run(host.command(["tc", "qdisc", "del", "dev", host.veth, "root"]), check=True)
        return await scenarios._finish(client, result, tasks, time.monotonic(), workers)


def scenario_steps(dep: Deployment, ref: Reference, scale: scenarios.Scale, model_dir: str,
                   kv_token: bytes = b"") -> list[tuple[str, Callable[[], ScenarioResult]]]:
    """Every scenario but the router SIGTERM (which ends a router), in the order both topologies run them
    (`model_dir`: the served model's directory, whose name is in the KV fingerprint; `kv_token`: the cluster's)."""
    steps = [
        ("prefill kill", lambda: scenarios.prefill_kill(dep, ref, scale)),
        ("decode kill", lambda: scenarios.decode_kill(dep, ref, scale)),
        ("prefill stall", lambda: scenarios.stall(dep, ref, scale, "prefill")),
        ("decode stall", lambda: scenarios.stall(dep, ref, scale, "decode")),
        ("disconnect", lambda: scenarios.client_disconnect(dep, ref, scale)),
        ("cancel", lambda: scenarios.cancel_before_first_token(dep, ref, scale)),
        ("abort", lambda: scenarios.abort_from_another_connection(dep, ref, scale)),
        ("stale peer", lambda: scenarios.stale_peer(dep, ref, scale)),
        ("overload", lambda: scenarios.overload(dep, ref, scale)),
        ("prefill pool stall", lambda: scenarios.prefill_pool_stall(dep, ref, scale)),
        ("rogue kv peer", lambda: rogue_kv_peer(dep, ref, model_dir, kv_token, scale.deadline_s)),
    ]
    runs: list[tuple[str, Callable[[], ScenarioResult]]] = [
        (name, lambda make=make: asyncio.run(make())) for name, make in steps]
    return runs + [("fuzz", lambda: fuzz(dep, examples=200))]


def _run(results: list[ScenarioResult], name: str, fn: Any) -> None:
    print(f"== {name}", flush=True)
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - a scenario that crashes is a row that says so
        result = ScenarioResult(name, "?", problems=[f"the scenario itself failed: {type(e).__name__}: {e}"])
        result.recovery_expected = False
    results.append(result)
    print(table(rows([result])), flush=True)


def one_host(work: Path, ref: Reference, scale: scenarios.Scale) -> tuple[list[ScenarioResult], dict[str, Any]]:
    from services.modelgen.default_model import default_model_dir
    from tests.service.conftest import start_server

    server = start_server(work / "serve", str(default_model_dir()), *SERVE_ARGS)
    target = [server.http_base.removeprefix("http://")]
    prom = Prometheus(work / "prometheus", target, scaled_rules(RULE_SPEEDUP))
    # And one with the file as it is, scraping as deploy/prometheus/prometheus.yml does: its one-minute
    # PdserveRouterDown is the alert whose window a soak can wait out.
    real = Prometheus(work / "prometheus-real", target, yaml.safe_load(ALERTS.read_text()), interval_s=5)
    dep: Deployment = LocalDeployment(server)
    results: list[ScenarioResult] = []
    try:
        for name, run in scenario_steps(dep, ref, scale, str(default_model_dir())):
            _run(results, name, run)
        time.sleep(10)  # the last scenario's alerts have their `for:` to go
        empty = [f"{b} / {p}" for b, p, expr in dashboard_queries() if not prom.query(expr)]
        since = time.time()
        _run(results, "sigterm", lambda: asyncio.run(scenarios.router_sigterm(dep, ref, scale,
                                                                               server.process.terminate)))
        server.process.wait(60)
        prom.wait_fired("PdserveRouterDown", 20, since)
        fired = {alert: prom.fired(alert) for alert in ALERTS_EXPECTED}
        real_router_down = real.wait_fired("PdserveRouterDown", 120, since)
        dashboards = {"queries": len(dashboard_queries()), "without_data": empty}
        return results, {"alerts_fired": fired, "dashboards": dashboards,
                         "unscaled_rules": {"PdserveRouterDown": real_router_down,
                                            **{a: real.fired(a) for a in ALERTS_EXPECTED if a != "PdserveRouterDown"}}}
    finally:
        prom.stop()
        real.stop()
        server.stop()


def _second_router_sigterm(cluster: Cluster, ref: Reference, scale: scenarios.Scale) -> ScenarioResult:
    """SIGTERM the router on d, whose pod drains and goes; the router on a, which every other scenario used,
    serves on with the same workers."""
    second = cluster.routers[1]
    result = asyncio.run(scenarios.router_sigterm(ClusterDeployment(cluster, second), ref, scale, second.terminate))
    second.process.wait(60)
    result.checks["the other router still serves"] = cluster.routers[0].serving()
    return result


def multihost(work: Path, ref: Reference, scale: scenarios.Scale) -> tuple[list[ScenarioResult], dict[str, Any]]:
    """Every scenario on the netns hosts, while a real Prometheus scrapes both routers with the scaled rules."""
    from services.bench.netns import unavailable
    from services.modelgen.default_model import default_model_dir
    from tests.multihost.cluster import start_cluster, stop_cluster

    if unavailable():
        print(f"(no netns test hosts: {unavailable()})")
        return [], {}
    cluster = start_cluster(default_model_dir(), list(SIZING))
    results: list[ScenarioResult] = []
    prom = Prometheus(work / "prometheus-hosts", [r.http_base.removeprefix("http://") for r in cluster.routers],
                      scaled_rules(RULE_SPEEDUP))
    try:
        cluster.add_node("e", "decode")
        cluster.add_node("f", "prefill")
        cluster.wait_workers(prefill=2, decode=2)
        dep = ClusterDeployment(cluster, cluster.routers[0])
        _run(results, "kv link down", lambda: asyncio.run(kv_channel_break(dep, ref, scale, "down", 5)))
        _run(results, "kv throttle", lambda: asyncio.run(kv_channel_break(dep, ref, scale, "throttle", 10)))
        token = cluster.kv_token.read_bytes().strip()
        for name, run in scenario_steps(dep, ref, scale, str(cluster.shared / "model"), token):
            _run(results, name, run)
        time.sleep(10)  # the last scenario's alerts have their `for:` to go
        empty = [f"{b} / {p}" for b, p, expr in dashboard_queries() if not prom.query(expr)]
        since = time.time()
        _run(results, "sigterm", lambda: _second_router_sigterm(cluster, ref, scale))
        prom.wait_fired("PdserveRouterDown", 20, since)
        return results, {"alerts_fired": {alert: prom.fired(alert) for alert in ALERTS_EXPECTED},
                         "dashboards": {"queries": len(dashboard_queries()), "without_data": empty}}
    finally:
        prom.stop()
        stop_cluster(cluster)


def _hosts_line(hosts: dict[str, Any]) -> str:
    """What the Prometheus that scraped the netns hosts' routers saw, for the report's header."""
    if not hosts:
        return ""
    return (" On the netns hosts (both routers scraped, scaled rules): "
            + ", ".join(f"{a} {'yes' if ok else 'NO'}" for a, ok in hosts["alerts_fired"].items())
            + f"; dashboard queries without data: {len(hosts['dashboards']['without_data'])} of "
            f"{hosts['dashboards']['queries']}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/chaos"))
    parser.add_argument("--skip-multihost", action="store_true")
    args = parser.parse_args()
    from services.modelgen.default_model import default_model_dir

    started = time.monotonic()
    ref = Reference.compute(str(default_model_dir()), ENV.home / "chaos")
    scale = scenarios.SOAK
    with tempfile.TemporaryDirectory(prefix="pdserve-chaos-") as tmp:
        results, extra = one_host(Path(tmp), ref, scale)
        if not args.skip_multihost:
            more, extra["netns_hosts"] = multihost(Path(tmp), ref, scale)
            results += more
    all_rows = rows(results)
    header = (f"# pdserve chaos soak\n\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}: "
              f"{platform.processor() or platform.machine()}, {len(results)} scenarios in "
              f"{time.monotonic() - started:.0f} s (`make chaos`). Alerts fired in a real Prometheus (rules of "
              f"deploy/prometheus/alerts.yml, durations / {RULE_SPEEDUP:g}): "
              + ", ".join(f"{a} {'yes' if ok else 'NO'}" for a, ok in extra["alerts_fired"].items())
              + ". With the file's own durations (a second Prometheus, 5 s scrapes): "
              + ", ".join(f"{a} {'yes' if ok else 'no'}" for a, ok in extra["unscaled_rules"].items())
              + f". Dashboard queries without data: {len(extra['dashboards']['without_data'])} of "
              f"{extra['dashboards']['queries']}." + _hosts_line(extra.get("netns_hosts") or {}))
    write(args.out, all_rows, header, {**extra, "scale": scale.__dict__})
    print("\n" + table(all_rows))
    print(f"\nwritten to {args.out}/chaos.md and chaos.json")


if __name__ == "__main__":
    main()
