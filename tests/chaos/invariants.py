"""The invariants checked after every scenario (issue 17), and a scenario's result.

- every request completed greedy-exact, or got a clear error, within its deadline: hung = wrong = unclear = 0;
- no KV block is held on any worker once the load stops: GetLoad(check_integrity=True) shows, on every
  worker, no used block, no reservation, nothing running or waiting, and a whole block pool;
- the service is healthy again within 30 s: gRPC health SERVING, every worker it had alive again, and a
  probe request answered exactly (recovery seconds are counted from the fault's end).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from services.proto_gen import generation_pb2 as pb
from tests.chaos.client import KINDS, Client, Outcome
from tests.chaos.workload import Req, prompts

RECOVERY_LIMIT_S = 30.0
SETTLE_S = 15.0


@dataclass
class Settled:
    leaked_blocks: int  # blocks held plus reservations, summed over the workers, once the load stopped
    problems: list[str]  # a worker dead, its pool not whole, requests still on it


async def settle(client: Client, timeout_s: float = SETTLE_S) -> Settled:
    """Waits until no worker holds anything (or `timeout_s`), then says what is still held."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = await client.load(check_integrity=True)
        busy = [w for w in report.workers
                if w.num_used_blocks or w.num_reservations or w.num_running or w.num_waiting or not w.alive]
        if not busy or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    problems = []
    for w in report.workers:
        if not w.alive:
            problems.append(f"{w.worker} is not alive")
        if not w.integrity_ok:
            problems.append(f"{w.worker}: block pool integrity: {w.integrity_error}")
        if w.num_running or w.num_waiting:
            problems.append(f"{w.worker} still runs {w.num_running} and queues {w.num_waiting} requests")
    leaked = sum(w.num_used_blocks + w.num_reservations for w in report.workers)
    return Settled(leaked, problems)


def _probe() -> Req:
    return Req(prompts("short")[0], 4, "grpc", deadline_s=10)


async def recover(client: Client, since: float, workers: set[str], replaced: dict[str, int] | None = None,
                  limit_s: float = 60.0) -> float | None:
    """Seconds from `since` until the service is whole again: health SERVING, each of `workers` alive (those in
    `replaced` under another pid than the one given), and a probe answered exactly; None if not within limit_s."""
    replaced = replaced or {}
    while time.monotonic() - since < limit_s:
        if await client.health() == 1:
            report = await client.load(check_integrity=False)
            alive = {w.worker for w in report.workers if w.alive and replaced.get(w.worker) not in (w.pid,)}
            if workers <= alive and (await client.send(_probe())).kind == "exact":
                return time.monotonic() - since
        await asyncio.sleep(0.2)
    return None


@dataclass
class ScenarioResult:
    """One row of the chaos report."""

    name: str
    topology: str
    outcomes: list[Outcome] = field(default_factory=list)
    leaked_blocks: int | None = None  # None: not measurable (the server is gone)
    recovery_s: float | None = None
    recovery_expected: bool = True
    checks: dict[str, bool] = field(default_factory=dict)  # what the scenario itself demands, by description
    problems: list[str] = field(default_factory=list)
    errors_allowed: bool = True  # False where the issue asks for completion (migration, overload's admitted)
    measured: dict[str, float | None] = field(default_factory=dict)  # timings worth reporting, never asserted

    def counts(self) -> Counter[str]:
        return Counter(o.kind for o in self.outcomes)

    def violations(self) -> list[str]:
        c = self.counts()
        out = [f"{c[k]} {k}: " + "; ".join(sorted({f'{o.via} {o.code} {o.detail}'[:300] for o in self.outcomes
                                                  if o.kind == k})[:4])
               for k in ("hung", "wrong", "unclear") if c[k]]
        if not self.errors_allowed and c["error"]:
            details = sorted({f"{o.via} {o.code} {o.detail}"[:160] for o in self.outcomes if o.kind == "error"})
            out.append(f"{c['error']} errors where every request should complete: {'; '.join(details[:4])}")
        if self.leaked_blocks:
            out.append(f"{self.leaked_blocks} KV blocks/reservations held after the load stopped")
        if self.recovery_expected and (self.recovery_s is None or self.recovery_s > RECOVERY_LIMIT_S):
            out.append(f"not healthy within {RECOVERY_LIMIT_S:.0f} s (recovery {self.recovery_s})")
        out += [f"check failed: {what}" for what, ok in self.checks.items() if not ok]
        return out + self.problems

    def row(self) -> dict[str, Any]:
        c = self.counts()
        return {
            "scenario": self.name, "topology": self.topology, "requests": len(self.outcomes),
            "exact": c["exact"], "clear_errors": c["error"], "cancelled": c["cancelled"], "hung": c["hung"],
            "wrong": c["wrong"], "unclear": c["unclear"], "leaked_blocks": self.leaked_blocks,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
            "checks": self.checks, "measured": self.measured, "violations": self.violations(),
            "error_codes": dict(Counter(o.code for o in self.outcomes if o.kind == "error")),
            "error_messages": sorted({f"{o.code}: {o.detail}"[:200] for o in self.outcomes if o.kind == "error"})[:8],
        }


def kinds_line(result: ScenarioResult) -> str:
    c = result.counts()
    return ", ".join(f"{k} {c[k]}" for k in KINDS if c[k])


def worker_names(report: pb.LoadReport) -> set[str]:
    return {w.worker for w in report.workers}
