"""The chaos report: one row per scenario, as a text table, markdown and json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.chaos.invariants import ScenarioResult

COLUMNS = (("scenario", "scenario"), ("topology", "topology"), ("requests", "requests"), ("exact", "completed-exact"),
           ("clear_errors", "clear errors"), ("cancelled", "cancelled"), ("hung", "hung"), ("wrong", "wrong"),
           ("unclear", "unclear"), ("leaked_blocks", "leaked blocks"), ("recovery_s", "recovery s"),
           ("verdict", "verdict"))

LEGEND = """\
- completed-exact: completed with the reference's greedy tokens (gRPC) or text (HTTP); for the fuzz row, a
  well-formed completion (its sampling is drawn, not greedy).
- clear errors: a gRPC status or HTTP code (or an error object in the stream) with a message.
- cancelled: the client itself cancelled or disconnected, as the scenario meant it to.
- hung: no answer within the request's deadline (DEADLINE_EXCEEDED, HTTP 504, or the client's timeout).
- wrong: completed with other tokens than the reference's. unclear: failed without a clear error (UNKNOWN,
  a 5xx other than 503, a dropped connection).
- leaked blocks: KV blocks plus reservations still held on the workers once the load stopped ("-": the
  server is gone). recovery s: from the fault's end until health SERVING, every worker alive and a probe
  exact ("-": the scenario leaves nothing to recover from).
- verdict: PASS when hung = wrong = unclear = leaked = 0, recovery <= 30 s and the scenario's own checks hold.
"""


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "verdict":
        return "PASS" if not row["violations"] else "FAIL"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title in COLUMNS]] + [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    out = [header, "", "| " + " | ".join(title for _, title in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]
    out += ["", LEGEND, "## What failed, and why", ""]
    failed = [r for r in rows if r["violations"]]
    for r in failed:
        out.append(f"- **{r['scenario']}** ({r['topology']}):")
        out += [f"  - {v}" for v in r["violations"]]
    if not failed:
        out.append("Nothing.")
    out += ["", "## Scenario checks", ""]
    for r in rows:
        for what, ok in r["checks"].items():
            out.append(f"- {'ok' if ok else 'FAILED'}: {r['scenario']} ({r['topology']}): {what}")
    out += ["", "## Measured (reported, not asserted)", ""]
    for r in rows:
        for what, value in r["measured"].items():
            shown = "-" if value is None else f"{value:.2f}"
            out.append(f"- {r['scenario']} ({r['topology']}): {what}: {shown}")
    return "\n".join(out) + "\n"


def write(out_dir: Path, rows: list[dict[str, Any]], header: str, extra: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "chaos.md").write_text(markdown(rows, header))
    (out_dir / "chaos.json").write_text(json.dumps({"scenarios": rows, **extra}, indent=2) + "\n")


def rows(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    return [r.row() for r in results]
