"""deploy/grafana/*.json: structure, datasource, and every PromQL expression checked against the
metrics module and by promtool."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.router.metric_specs import HISTOGRAM_NAMES, METRIC_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARDS = sorted(GRAFANA_DIR.glob("*.json"))
EXPECTED = {"overview", "pools", "kv-transfer", "prefix-cache"}

GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan", "Inf", "NaN",
}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
LABEL_VALUES = re.compile(r"label_values\((.+),\s*\w+\)")
IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels plus those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query target, template-variable queries included."""
    out = [(p["title"], t["expr"]) for p in all_panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # Grafana's label_values(selector, label) is not PromQL: check its selector.
            match = LABEL_VALUES.fullmatch(query.strip())
            out.append((f"variable {var['name']}", match.group(1) if match else query))
    return out


def concrete(expr: str, variables: set[str]) -> str:
    """Replace Grafana's interval macros with a duration and template variables with a regex."""
    for macro in GRAFANA_INTERVALS:
        expr = expr.replace(macro, "5m")

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"undeclared template variable ${name} in {expr!r}"
        return ".*"

    return VARIABLE.sub(sub, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (a lexical scan, good for dashboard queries)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = GROUPING.sub("", expr)
    return {name for name in IDENTIFIER.findall(expr) if name not in PROMQL_WORDS}


def family(series: str) -> str:
    """The family a queried series belongs to: histograms are queried as _bucket, _sum, _count."""
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAM_NAMES:
            return series.removesuffix(suffix)
    return series


def test_the_four_dashboards_exist() -> None:
    assert {p.stem for p in DASHBOARDS} == EXPECTED


def test_metric_name_scanner() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, stage) (rate(pdserve_request_stage_seconds_bucket'
            '{model_name=~"$m", stage=~"transfer|decode"}[5m]))) / on (x) group_left (y) foo:bar offset 5m '
            '+ count(up == 0) or vector(1e-9)')
    assert metric_names(expr) == {"pdserve_request_stage_seconds_bucket", "foo:bar", "up"}
    assert family("pdserve_kv_transfer_bytes_count") == "pdserve_kv_transfer_bytes"
    assert family("pdserve_prompt_tokens_count") == "pdserve_prompt_tokens_count"  # not a histogram


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_structure(path: Path) -> None:
    board = load(path)
    assert board["schemaVersion"] >= 36
    assert board["title"] and board["uid"]
    panels = all_panels(board)
    assert panels, "no panels"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    assert all(isinstance(i, int) and i > 0 for i in ids)

    cells: dict[tuple[int, int], str] = {}
    for p in board["panels"]:
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) and not isinstance(pos[k], bool) for k in "xywh"), p["title"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] > 0 and pos["h"] > 0, p["title"]
        assert pos["x"] + pos["w"] <= 24, f"{p['title']!r} overflows the 24-column grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_uids_are_unique() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)), uids


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_datasource_is_the_template_variable(path: Path) -> None:
    board = load(path)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds is not None and ds["type"] == "datasource" and ds["query"] == "prometheus"
    want = {"type": "prometheus", "uid": "${datasource}"}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == want, var["name"]
    for panel in all_panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == want, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no queries"
        for target in panel["targets"]:
            assert target["datasource"] == want, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_queried_metrics_exist(path: Path) -> None:
    board = load(path)
    for title, expr in expressions(board):
        names = metric_names(expr)
        assert names, f"{title!r}: no metric found in {expr!r}"
        unknown = {n for n in names if family(n) not in METRIC_NAMES}
        assert not unknown, f"{title!r} queries metrics the router does not export: {sorted(unknown)}"
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in names), f"{title!r}: quantile of non-buckets"
            assert re.search(r"by \(le\b", expr), f"{title!r}: histogram_quantile must keep the le label"


def test_promtool_parses_every_expression(promtool: Path, tmp_path: Path) -> None:
    rules = []
    for path in DASHBOARDS:
        board = load(path)
        variables = {v["name"] for v in board["templating"]["list"]}
        for i, (_, expr) in enumerate(expressions(board)):
            record = f"dashboard:{path.stem.replace('-', '_')}:expr{i}"
            rules.append({"record": record, "expr": concrete(expr, variables)})
    assert len(rules) > 40
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    check = subprocess.run([str(promtool), "check", "rules", str(rule_file)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout


def test_promtool_rejects_a_broken_expression(promtool: Path, tmp_path: Path) -> None:
    """The check above can fail: an unbalanced query is refused."""
    rule_file = tmp_path / "bad.yml"
    bad = concrete('sum(rate(pdserve_requests_finished_total{model_name=~"$model_name"}[$__rate_interval])',
                   {"model_name"})
    rule_file.write_text(json.dumps({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": bad}]}]}))
    check = subprocess.run([str(promtool), "check", "rules", str(rule_file)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode != 0
