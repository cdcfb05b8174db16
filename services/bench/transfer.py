"""`pdserve bench transfer`: KV hand-off bandwidth beside ucx_perftest, then the TTFT breakdown of a long prompt.

`--hosts netns` runs it between hosts of its own (netns.RayHosts; needs root): a Ray head on host a, a
node advertising "prefill" on b and one advertising "decode" on c, token authentication on. The size
sweep runs as a driver on a (bandwidth.py with --ray-address): the hand-off from b to c beside
ucx_perftest between b and c over tcp. Then a router on a serves across the hosts (prefill on b,
decode on c) for the TTFT breakdown and TPOT, next to colocated and disaggregated servers on this
one host, measured after the hosts are gone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.bench import bandwidth
from services.bench.netns import RayHosts, unavailable

if TYPE_CHECKING:
    from services.bench.ttft import Server, TTFTRun

GRPC_PORT = 50051
HTTP_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bandwidth.add_arguments(parser)
    parser.add_argument("--model", default=None, help="model for the TTFT breakdown (default: the tiny preset)")
    parser.add_argument("--ttft-prompt-len", type=int, default=1000)
    parser.add_argument("--ttft-repeats", type=int, default=5)
    parser.add_argument("--no-ttft", action="store_true", help="skip the TTFT breakdown")
    parser.add_argument(
        "--hosts", default="local", choices=("local", "netns"),
        help="local: two actors on this host; netns: hosts a (Ray head, router), b (prefill) and c (decode) made "
        "of network namespaces here (needs root)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.hosts == "netns":
        return _run_across_hosts(args)
    status = bandwidth.run(args)
    if status or args.no_ttft:
        return status
    from services.bench.ttft import format_breakdown, run_breakdown

    print()
    print(format_breakdown(run_breakdown(args.model, args.ttft_prompt_len, args.ttft_repeats), args.ttft_prompt_len))
    return 0


def _run_across_hosts(args: argparse.Namespace) -> int:
    from services.modelgen.default_model import resolve_model

    problem = unavailable() or ("--ray-address does not go with --hosts netns" if args.ray_address else "")
    if problem:
        print(f"error: {problem}")
        return 2
    model = resolve_model(args.model)  # a path every host sees (their /tmp is their own)
    with RayHosts({"b": "prefill", "c": "decode"}) as hosts:
        status = _sweep(hosts, args)
        across = None if status or args.no_ttft else _serve_across(hosts, model, args)
    if across is None:
        return status
    from services.bench.ttft import format_breakdown, run_breakdown

    runs = [*run_breakdown(model, args.ttft_prompt_len, args.ttft_repeats), across]
    print()
    print(format_breakdown(runs, args.ttft_prompt_len))
    if args.json:
        figures = json.loads(Path(args.json).read_text())
        figures["ttft"] = [{"mode": r.mode, "ttft_s": r.ttft_s, "stages_s": r.stages_s, "tpot_s": r.tpot_s}
                           for r in runs]
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _sweep(hosts: RayHosts, args: argparse.Namespace) -> int:
    """The size sweep as a driver on host a; its table goes to stdout, its figures to --json."""
    figures = hosts.shared / "bandwidth.json"
    own = bandwidth.forwarded(argparse.Namespace(**{**vars(args), "json": None}))
    argv = [sys.executable, "-m", "services.cli", "bench", "transfer", *own, "--no-ttft",
            "--ray-address", hosts.address, "--json", str(figures)]  # fmt: skip
    print(f"hand-off from host b to host c; ucx_perftest between them; Ray head {hosts.address} on host a", flush=True)
    done = subprocess.run(hosts.head.command(argv), env=hosts.env(), timeout=3600)
    if done.returncode:
        print(f"the sweep on host a failed ({done.returncode}):\n{hosts.logs()}")
        return done.returncode
    if args.json:
        shutil.copyfile(figures, args.json)
    return 0


def _serve_across(hosts: RayHosts, model: str, args: argparse.Namespace) -> TTFTRun:
    """A router on host a (a Ray driver) with its prefill worker on b and decode worker on c: TTFT and TPOT."""
    from services.bench.ttft import Server, measure

    argv = ["pdserve", "serve", "--model", model, "--mode", "disagg", "--ray-address", hosts.address,
            "--worker-group-resources", "--host", "0.0.0.0", "--grpc-port", str(GRPC_PORT),
            "--http-port", str(HTTP_PORT), "--local-prefill-threshold", "0", "--cpus-per-worker", "1"]  # fmt: skip
    router = hosts.start(hosts.head, argv, "router")
    try:
        server = Server(f"{hosts.head.ip}:{GRPC_PORT}", f"http://{hosts.head.ip}:{HTTP_PORT}")
        _wait_serving(server, router, hosts)
        return measure(server, "disagg, 3 hosts", args.ttft_prompt_len, args.ttft_repeats, seed=0)
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(60)
        except subprocess.TimeoutExpired:
            router.kill()


def _wait_serving(server: Server, router: subprocess.Popen[bytes], hosts: RayHosts, timeout_s: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while True:
        with grpc.insecure_channel(server.grpc_target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        if router.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the router on host a is not serving:\n{hosts.logs()}")
        time.sleep(0.5)
