"""The rules the chaos suite loads into Prometheus are alerts.yml's, only faster (tests/chaos/prometheus.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chaos.prometheus import ALERTS, scaled_rules, seconds


def test_seconds() -> None:
    assert seconds("5m") == 300 and seconds("1h30m") == 5400 and seconds("30s") == 30
    with pytest.raises(ValueError):
        seconds("5 minutes")


def test_scaled_rules_differ_from_the_file_only_in_durations() -> None:
    real = yaml.safe_load(ALERTS.read_text())
    fast = scaled_rules(60)
    no_durations = re.compile(r"\[[0-9a-z]+\]")
    for real_group, fast_group in zip(real["groups"], fast["groups"], strict=True):
        if "interval" in real_group:
            assert seconds(fast_group["interval"]) == max(1, seconds(real_group["interval"]) / 60)
        for a, b in zip(real_group["rules"], fast_group["rules"], strict=True):
            assert {k: v for k, v in a.items() if k not in ("expr", "for")} == \
                   {k: v for k, v in b.items() if k not in ("expr", "for")}
            assert no_durations.sub("[]", a["expr"]) == no_durations.sub("[]", b["expr"])
            if "for" in a:
                assert seconds(b["for"]) == max(1, seconds(a["for"]) / 60)
    assert "[5s]" in yaml.safe_dump(fast) and "[60s]" in yaml.safe_dump(fast)  # 5m and 1h windows


def test_promtool_accepts_the_scaled_rules(promtool: Path, tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(scaled_rules(60)))
    check = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
