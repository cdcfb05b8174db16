"""`pdserve drain-node`: let this host's Ray node go without dropping a request (a worker pod's pre-stop hook).

    ask the GCS to drain the node ─► routers see it within a poll (pool.py) and send its workers nothing new
    ─► wait --settle-s, so that every router has polled ─► wait until each pdserve worker on the node has
    nothing running, waiting, reserved or held in KV blocks ─► exit 0
Exits 1 when --timeout-s passes first, 2 when the GCS refuses. The node itself keeps running: stopping
it (`ray stop`, the pod's end) is the caller's part, as with `ray drain-node`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from typing import Any

import ray
from ray.core.generated import autoscaler_pb2
from ray.exceptions import GetTimeoutError, RayActorError

from services.worker.messages import LoadInfo

NAMESPACE = "pdserve"  # where the routers' named worker actors live
POLL_S = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the Ray cluster's GCS, HEAD:PORT (default: the cluster of this host's Ray node)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="give up after this many seconds: exit 1, naming the workers still busy")
    p.add_argument("--settle-s", type=float, default=3.0,
                   help="seconds to wait after the drain request before an idle worker counts as drained: "
                        "routers re-read the nodes once a second and may send a request until they do")
    p.add_argument("--node-id", default=None, help="drain this node (hex id) instead of this host's")


def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout_s
    ray.init(address=args.address or "auto", namespace=NAMESPACE, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        return drain(args.node_id or ray.get_runtime_context().get_node_id(), deadline, args.settle_s)
    finally:
        ray.shutdown()


def drain(node_id: str, deadline: float, settle_s: float) -> int:
    """Drains `node_id` and waits for its workers (see the module docstring); returns the exit status."""
    accepted, why = request_drain(node_id, deadline)
    if not accepted:
        print(f"drain-node: the GCS did not accept draining node {node_id}: {why}", file=sys.stderr)
        return 2
    workers = node_workers(node_id)
    print(f"drain-node: node {node_id} is draining; pdserve workers on it: {', '.join(workers) or 'none'}",
          flush=True)
    if workers:
        time.sleep(max(0.0, min(settle_s, deadline - time.monotonic())))
    busy = wait_idle(node_id, deadline)
    if busy:
        print(f"drain-node: timed out; still busy on node {node_id}: {'; '.join(busy)}", file=sys.stderr)
        return 1
    print(f"drain-node: node {node_id} is drained", flush=True)
    return 0


def request_drain(node_id: str, deadline: float) -> tuple[bool, str]:
    """Asks the GCS to drain the node, as autoscaler v2 does before it ends one: Ray places nothing new
    there, and the node shows as draining (pool.draining_node_ids). Preemption is the reason the GCS
    accepts for a busy node; the deadline tells it when the node will be gone."""
    deadline_ms = int(time.time() * 1000 + max(0.0, deadline - time.monotonic()) * 1000)
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)  # type: ignore[attr-defined]
    reason = autoscaler_pb2.DRAIN_NODE_REASON_PREEMPTION  # type: ignore[attr-defined]
    accepted, message = gcs.drain_node(node_id, reason, "pdserve drain-node: the node is stopping", deadline_ms)
    return bool(accepted), str(message)


def node_workers(node_id: str) -> list[str]:
    """The names of the pdserve worker actors pinned to the node (pool.py names them after it)."""
    pattern = re.compile(rf"pdserve-(prefill|decode|colocated)-{re.escape(node_id[:12])}-\d+")
    return sorted(name for name in ray.util.list_named_actors() if pattern.fullmatch(name))


def wait_idle(node_id: str, deadline: float) -> list[str]:
    """Polls the node's workers until none is busy; returns those still busy at the deadline (empty: drained)."""
    while True:
        busy = [f"{name} ({what})" for name in node_workers(node_id) if (what := worker_busy(name, deadline))]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(POLL_S)


def worker_busy(name: str, deadline: float) -> str:
    """What the worker still has, e.g. "2 running, 1 reserved"; empty when it has nothing, or is gone."""
    try:
        actor: Any = ray.get_actor(name, namespace=NAMESPACE)
        # take_deltas stays False: the routers' polls count those.
        load: LoadInfo = ray.get(actor.load.remote(), timeout=max(1.0, min(10.0, deadline - time.monotonic())))
    except GetTimeoutError:
        return "no answer to load()"
    except (ValueError, RayActorError):  # gone, or restarting: what it had has failed already
        return ""
    return busy_with(load)


def busy_with(load: LoadInfo) -> str:
    """What a worker's load report says it still has to finish; empty when nothing."""
    s = load.stats
    counts = {"running": s.num_running, "waiting": s.num_waiting + s.num_waiting_for_remote_kv,
              "reserved": load.num_reservations, "KV blocks held": load.num_used_blocks}
    return ", ".join(f"{n} {what}" for what, n in counts.items() if n)
