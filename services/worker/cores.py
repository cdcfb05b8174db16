"""Which cores each process of a one-machine CPU deployment runs on (`pdserve serve --cpu-bind auto`).

On a few cores, the router, Ray's own processes and every worker otherwise share all of them, and a decode
step is descheduled whenever a prompt is prefilled. Bound, each worker holds cores of its own, and the router
with Ray's daemons (which it starts, so they inherit its cores) runs on the decode workers' cores: prompts are
what a disaggregated deployment on a few cores waits for, while a decode step has room to spare under its
TPOT target, and the router's work is the decode workers' tokens. On 2 cores, disagg 1+1 at 6 requests/s,
the goodput doubled against the router on the prefill core, and the TPOT at 1 request/s was no worse
(services/bench/README.md, "Where the router runs"):

    2 cores, disagg 1+1:  prefill-0 [0]    decode-0 [1] + router, Ray
    2 cores, colocated 1: colocated-0 [0, 1] + router, Ray

Workers get the cores in plan order, the same number each (the leftover ones go to the last); with more
workers than cores nothing is bound.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

Cores = tuple[int, ...]


def share_cores(cores: Sequence[int], roles: Sequence[str]) -> list[Cores] | None:
    """The cores of each worker (`roles` in plan order), or None where there are fewer cores than workers."""
    if not roles or len(cores) < len(roles):
        return None
    each = len(cores) // len(roles)
    shares = [tuple(cores[i * each:(i + 1) * each]) for i in range(len(roles))]
    shares[-1] += tuple(cores[len(roles) * each:])
    return shares


def router_cores(shares: Sequence[Cores], roles: Sequence[str]) -> Cores:
    """The router's (and Ray's daemons') cores: the decode (or colocated) workers'."""
    return tuple(sorted({c for share, role in zip(shares, roles, strict=True) if role != "prefill" for c in share}))


def bind_process(cores: Iterable[int]) -> None:
    """Runs every thread of this process, and each it starts later, on `cores` alone."""
    allowed = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), allowed)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            continue
    os.sched_setaffinity(0, allowed)
