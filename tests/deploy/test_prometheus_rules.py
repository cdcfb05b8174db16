"""deploy/prometheus/: alert rules, their promtool unit tests, and the scrape configs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from services.router.metric_specs import HISTOGRAM_NAMES, METRIC_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = REPO_ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
REQUIRED_ALERTS = {"PdserveTTFTSLOBurnFast", "PdserveTTFTSLOBurnSlow", "PdserveKVTransferFailures",
                   "PdserveKVCacheNearFull", "PdserveWorkerDown", "PdserveRouterDown"}
ROUTER_JOB = "pdserve-router"


def run(promtool: Path, *args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def selected_metrics(expr: str) -> set[str]:
    """Metric names in a rule expression (lexical scan: drop strings, matchers, ranges, groupings)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = {"and", "or", "unless", "bool", "offset"}
    return {n for n in re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr) if n not in words}


def test_check_rules(promtool: Path) -> None:
    check = run(promtool, "check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout


def test_required_alerts_are_defined_with_severity_and_summary() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert REQUIRED_ALERTS <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "critical", "warning", "ticket"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_rules_query_only_exported_metrics() -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        for name in selected_metrics(rule["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            known = name in METRIC_NAMES or base in HISTOGRAM_NAMES or name in recorded or name == "up"
            assert known, f"{rule.get('alert') or rule.get('record')}: unknown metric {name!r}"


def test_unit_tests_pass(promtool: Path) -> None:
    result = run(promtool, "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_cover_every_alert() -> None:
    doc = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", [])}
    assert tested == {r["alert"] for r in rules() if "alert" in r}


def test_unit_tests_can_fail(promtool: Path, tmp_path: Path) -> None:
    """A wrong expectation makes `promtool test rules` fail, so the pass above means something."""
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    text = (PROM_DIR / "alerts_test.yml").read_text()
    wrong = text.replace("worker: decode-0", "worker: decode-1")
    assert wrong != text
    (tmp_path / "alerts_test.yml").write_text(wrong)
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "PdserveKVCacheNearFull" in result.stdout + result.stderr


def test_check_static_config(promtool: Path) -> None:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    router = jobs[ROUTER_JOB]
    assert router.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in router["static_configs"] for t in sc["targets"]] == ["localhost:8000"]
    check = run(promtool, "check", "config", "prometheus.yml")  # also checks rule_files: alerts.yml
    assert check.returncode == 0, check.stdout + check.stderr


def test_check_kubernetes_config(promtool: Path, tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery, so the discovery block is swapped for a
    static target before promtool checks everything else (relabelling, rule files)."""
    config = yaml.safe_load((PROM_DIR / "prometheus-kubernetes.yml").read_text())
    router = next(job for job in config["scrape_configs"] if job["job_name"] == ROUTER_JOB)
    assert router["kubernetes_sd_configs"] == [{"role": "pod"}]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in router["relabel_configs"]
             if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "http"
    del router["kubernetes_sd_configs"]
    router["static_configs"] = [{"targets": ["router:8000"]}]
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    check = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
