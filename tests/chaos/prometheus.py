"""A real Prometheus server (Debian's, unpacked into .tools/ by scripts/install_promtool.sh) that scrapes a
pdserve router while the chaos suite runs, with deploy/prometheus/alerts.yml loaded.

The rules' windows are hours and minutes; a test has seconds. `scaled_rules` derives the rules the test
loads from the real file by dividing every duration in it (rate windows, `for:`, group intervals) by one
factor, so that the alerts keep their shape (what fires, and for how long it must hold) and cannot drift
from the file: a rule added to or changed in alerts.yml is loaded as it is, only faster.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / ".tools" / "prometheus"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = REPO / "deploy" / "grafana"
JOB = "pdserve-router"  # alerts.yml's PdserveRouterDown matches this job name

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def seconds(duration: str) -> float:
    """A Prometheus duration ("1h30m", "5m", "30s") in seconds."""
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def _scaled(duration: str, factor: float, floor_s: float) -> str:
    return f"{max(floor_s, round(seconds(duration) / factor)):g}s"


def scaled_rules(factor: float, floor_s: float = 1.0, source: Path = ALERTS) -> dict[str, Any]:
    """alerts.yml with every duration divided by `factor` (none below `floor_s`)."""
    doc = yaml.safe_load(source.read_text())
    for group in doc["groups"]:
        if "interval" in group:
            group["interval"] = _scaled(group["interval"], factor, floor_s)
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[([0-9a-z]+)\]", lambda m: f"[{_scaled(m.group(1), factor, floor_s)}]",
                                  rule["expr"])
            if "for" in rule:
                rule["for"] = _scaled(rule["for"], factor, floor_s)
    return doc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """`prometheus` scraping `targets` (host:port of routers' HTTP) every second, with `rules` loaded."""

    def __init__(self, work: Path, targets: list[str], rules: dict[str, Any], interval_s: int = 1) -> None:
        if not PROMETHEUS.is_file():
            raise FileNotFoundError(f"{PROMETHEUS} is missing: run `make setup` (scripts/install_promtool.sh .tools)")
        work.mkdir(parents=True, exist_ok=True)
        (work / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [{"job_name": JOB, "scrape_interval": f"{interval_s}s",
                                "scrape_timeout": f"{interval_s}s", "static_configs": [{"targets": targets}]}],
        }
        (work / "prometheus.yml").write_text(json.dumps(config))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "prometheus.log"
        self.started = time.time()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(PROMETHEUS), "--config.file=prometheus.yml", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
                cwd=work, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params: str) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        if reply.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {reply}")
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def fired(self, alert: str, since: float | None = None) -> bool:
        """Whether `alert` has been firing at any evaluation since `since` (unix time; default: the start)."""
        start = since if since is not None else self.started
        data = self.api("query_range", query=f'ALERTS{{alertname="{alert}",alertstate="firing"}}',
                        start=f"{start:.3f}", end=f"{time.time():.3f}", step="1s")
        return bool(data["result"])

    def wait_fired(self, alert: str, timeout_s: float, since: float | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.fired(alert, since):
            if time.monotonic() > deadline:
                return False
            time.sleep(1)
        return True


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) of every Grafana query, with $__rate_interval and friends as 5m and each
    template variable as a match-anything regex, as tests/deploy/test_dashboards.py reads them."""
    from tests.deploy.test_dashboards import DASHBOARDS, concrete, expressions, load

    out = []
    for path in DASHBOARDS:
        board = load(path)
        variables = {v["name"] for v in board["templating"]["list"]}
        for title, expr in expressions(board):
            out.append((path.stem, title, concrete(expr, variables)))
    return out
