"""`pdserve bench transfer`: KV hand-off bandwidth between two Ray actors, beside ucx_perftest.

One request is every layer of a token range, sent layer by layer from a "compute" thread, exactly
as a prefill worker does, into a decode actor's real kv_cache at random block ids. By default
the prefill actor's KV sits at random blocks of a KV cache in shared memory and goes with
`KVSender.submit` as `KVBlocks`, as a prefill worker on CPU sends it; `--source tensors` sends it
as `KVTensors`, which are staged (or registered in place, `--staging-mib 0`).
A request's time runs from the first layer's submission (prefill actor) to the moment the last
of it is in place (decode actor; `KVReceiver.wait` reports when that was), both on the host's
monotonic clock. The decode actor starts waiting when the request is announced, so no Ray call
reaches it mid-transfer; the first request of each size is checked bit for bit there, and the
others are not read back. On one host each actor is pinned to a core of its own (see
`services.worker.cores.bind_process`; `--no-pin` leaves them be); ucx_perftest runs as shipped.

The reference and the hand-off take turns: each round of a size runs ucx_perftest once per
transport, then `--repeats` requests, and the ratio is taken within the round. On a shared host
whose speed drifts by 2x over minutes, that keeps each ratio side by side; the table gives the
median over rounds of every column, and what the hand-off's KV crossed (KVArrival.transport).

With `--ray-address`, the bench joins that Ray cluster instead and places the prefill actor on a
node that advertises a "prefill" resource, the decode actor on one with "decode", and the two ends
of ucx_perftest beside them (server beside the prefill actor, whose memory the gets read): what
`pdserve bench transfer --hosts netns` runs on hosts of its own (netns.py). A request's time then
spans the two nodes' monotonic clocks, which are one clock only where the nodes share a machine (as
those hosts do); the actors are not pinned there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from typing import Any

from services.bench.perftest import MIB, PerftestEnd, run_perftest, run_perftest_between
from services.transfer.config import CUDA_UCX_TLS, DEFAULT_UCX_TLS, TransferConfig
from services.transfer.fingerprint import KVFingerprint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes-mib", default="1,2,4,8,16,32,64", help="per-request KV sizes in MiB")
    parser.add_argument("--repeats", type=int, default=7, help="timed requests per size (median reported)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--ucx-tls",
        default="",
        help=f"UCX transports (default: UCX_TLS from the environment, else {DEFAULT_UCX_TLS}, plus {CUDA_UCX_TLS} "
        "where CUDA is available)",
    )
    parser.add_argument(
        "--staging-mib", type=int, default=TransferConfig.staging_mib, help="0: register the tensors in place"
    )
    parser.add_argument(
        "--spin-us", type=int, default=TransferConfig.spin_us, help="receiver polling window (0: sleep at once)"
    )
    parser.add_argument(
        "--source",
        default="cache",
        choices=("cache", "tensors"),
        help="send from a shared KV cache (as prefill workers on CPU do) or as tensors (staged)",
    )
    parser.add_argument(
        "--perftest-test", default=None, help="ucx_perftest test (default: tag_bw on one host, ucp_get across hosts)"
    )
    parser.add_argument(
        "--perftest-tls", default=None, help="ucx_perftest's transports, each its own run (default: posix,tcp on one "
        "host, tcp across hosts)"
    )
    parser.add_argument(
        "--ray-address", default=None, help="join this Ray cluster: actors on nodes advertising 'prefill' and 'decode'"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="per size: ucx_perftest once per transport, then --repeats requests"
    )
    parser.add_argument("--no-perftest", action="store_true", help="skip the ucx_perftest reference")
    parser.add_argument(
        "--no-pin", action="store_true", help="leave the two actors unpinned (by default, on one host, each gets a "
        "core of its own; on nodes of a cluster they are never pinned)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")


class _Pair:
    """A prefill and a decode actor with a connection between them (Ray must be up).

    `placed`: on nodes advertising "prefill" and "decode" resources (a cluster), else anywhere.
    """

    def __init__(self, args: argparse.Namespace, fp: KVFingerprint, sizes: list[int], placed: bool) -> None:
        import ray

        from services.bench.transfer_actors import DecodeSide, PrefillSide

        config = TransferConfig(
            timeout_s=60.0,
            ucx_tls=args.ucx_tls,
            staging_mib=args.staging_mib,
            spin_us=args.spin_us,
        )
        self.fp = fp
        self.token_bytes = fp.num_layers * fp.payload_bytes(1)
        max_tokens = max(sizes) // self.token_bytes
        self.num_blocks = 2 * (max_tokens // fp.block_size + 1)
        decode: Any = ray.remote(DecodeSide).options(**_on("decode", placed, 1))
        decode = decode.remote(fp, config, self.num_blocks, on_node=placed)
        cache_blocks = self.num_blocks if args.source == "cache" else 0
        prefill: Any = ray.remote(PrefillSide).options(**_on("prefill", placed, 1))
        prefill = prefill.remote(fp, config, cache_blocks, on_node=placed)
        self.decode, self.prefill = decode, prefill
        cpus = sorted(os.sched_getaffinity(0))
        if not args.no_pin and not placed and len(cpus) >= 2:
            ray.get([prefill.pin.remote({cpus[0]}), decode.pin.remote({cpus[1]})])
        self.peer = ray.get(decode.start.remote())
        if ray.get(prefill.start.remote()) != bool(cache_blocks):
            raise RuntimeError("the prefill actor could not allocate its KV cache in shared memory")
        self.rng = random.Random(0)
        self.requests = 0
        self.transport = ""  # what the last request's KV crossed

    def bandwidth(self, size: int, repeats: int) -> float:
        """Median GB/s of `repeats` requests of `size` bytes (after one that warms buffers up)."""
        import ray

        fp = self.fp
        tokens = max(1, size // self.token_bytes)
        ray.get(self.prefill.prepare.remote(tokens, size))
        samples = []
        for rep in range(repeats + 1):
            rid = f"bench-{self.requests}"
            self.requests += 1
            blocks = self.rng.sample(range(self.num_blocks), (tokens + fp.block_size - 1) // fp.block_size)
            ray.get(self.decode.expect.remote(rid, blocks, 0, tokens))
            t0 = ray.get(self.prefill.send_request.remote(self.peer, rid, 0, tokens, size))
            arrival = ray.get(self.decode.wait.remote(rid))
            self.transport = arrival.transport
            if rep:
                ray.get(self.decode.forget.remote(rid))
                samples.append(tokens * self.token_bytes / (arrival.at - t0) / 1e9)
            elif not ray.get(self.decode.check.remote(rid, size)):  # the first of each size is checked
                raise RuntimeError(f"a {size}-byte request's KV did not land exactly")
        return statistics.median(samples)

    def close(self) -> None:
        import ray

        ray.get([self.prefill.close.remote(), self.decode.close.remote()])


def _on(resource: str, placed: bool, cpus: float) -> dict[str, Any]:
    """Ray options for an actor of `cpus` CPUs, on a node advertising `resource` when `placed`."""
    return {"num_cpus": cpus, "resources": {resource: 0.5}} if placed else {"num_cpus": cpus}


class _Reference:
    """ucx_perftest beside the pair: on this host, or its ends on the prefill and decode nodes.

    Across nodes, each transport runs twice: as shipped ("tcp"), and with the UCX_TCP_* settings the
    hand-off itself runs with ("tcp*", TransferConfig.ucx_env).
    """

    def __init__(self, args: argparse.Namespace, placed: bool) -> None:
        import ray

        self.test = args.perftest_test or ("ucp_get" if placed else "tag_bw")
        tls = (args.perftest_tls or ("tcp" if placed else "posix,tcp")).split(",")
        self.variants: dict[str, tuple[str, dict[str, str]]] = {t: (t, {}) for t in tls}
        self.ends: tuple[Any, Any] | None = None
        if placed and not args.no_perftest:
            actor = ray.remote(PerftestEnd)
            self.ends = (actor.options(**_on("prefill", True, 0)).remote(),
                         actor.options(**_on("decode", True, 0)).remote())
            ours = {k: v for k, v in TransferConfig(ucx_tls="tcp").ucx_env().items() if k.startswith("UCX_TCP_")}
            self.variants.update({f"{t}*": (t, ours) for t in tls if "tcp" in t})

    def gbps(self, size: int) -> dict[str, float]:
        if self.ends is None:
            return {label: run_perftest(size, t, self.test, env=env).gbps for label, (t, env) in self.variants.items()}
        return {
            label: run_perftest_between(*self.ends, size, t, self.test, env).gbps
            for label, (t, env) in self.variants.items()
        }


def _measure(args: argparse.Namespace, fp: KVFingerprint, sizes: list[int]) -> list[dict[str, Any]]:
    import ray

    placed = bool(args.ray_address)
    if placed:
        ray.init(address=args.ray_address, log_to_driver=False)
        _wait_for_resources(("prefill", "decode"))
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pair = _Pair(args, fp, sizes, placed)
        reference = _Reference(args, placed)
        rows = []
        for size in sizes:
            rounds = []
            for _ in range(args.rounds):
                ref = {} if args.no_perftest else reference.gbps(size)
                rounds.append((pair.bandwidth(size, args.repeats), ref))
            rows.append(_row(size, rounds, pair.transport))
        pair.close()
        return rows
    finally:
        ray.shutdown()


def _row(size: int, rounds: list[tuple[float, dict[str, float]]], transport: str) -> dict[str, Any]:
    """One size's figures: medians over rounds; the ratio to the best reference is taken within each round."""
    row: dict[str, Any] = {"size_mib": size / MIB, "pdserve_gbps": statistics.median(g for g, _ in rounds),
                           "transport": transport}
    if rounds[0][1]:
        for tls in rounds[0][1]:
            row[f"perftest_{tls}_gbps"] = statistics.median(ref[tls] for _, ref in rounds)
        row["ratio_to_best"] = statistics.median(g / max(ref.values()) for g, ref in rounds)
        row["ratio_to"] = {tls: statistics.median(g / ref[tls] for g, ref in rounds) for tls in rounds[0][1]}
        row["rounds"] = [{"pdserve_gbps": g, **{f"perftest_{t}_gbps": v for t, v in ref.items()}} for g, ref in rounds]
    return row


def _wait_for_resources(names: tuple[str, ...], timeout_s: float = 120.0) -> None:
    """Until the cluster has nodes that advertise every resource in `names` (they may still be joining)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while not all(name in ray.cluster_resources() for name in names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Ray node advertises {names} within {timeout_s:.0f}s: {ray.cluster_resources()}")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(float(s) * MIB) for s in args.sizes_mib.split(",") if s.strip()]
        fp = KVFingerprint("bench", "float32", args.block_size, args.layers, args.kv_heads, args.head_dim)
        if not sizes or min(sizes) < fp.num_layers * fp.payload_bytes(1) or args.repeats < 1:
            raise ValueError("need --repeats >= 1 and sizes of at least one token of every layer")
        if args.rounds < 1:
            raise ValueError("need --rounds >= 1")
        TransferConfig(ucx_tls=args.ucx_tls, staging_mib=args.staging_mib, spin_us=args.spin_us)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    rows = _measure(args, fp, sizes)
    _print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2, default=str)
    return 0


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    where = f"across Ray nodes (cluster {args.ray_address})" if args.ray_address else "between two actors on this host"
    test = args.perftest_test or ("ucp_get" if args.ray_address else "tag_bw")
    print(
        f"KV hand-off from {args.source} {where}, {args.layers} layers x {args.kv_heads} kv heads x {args.head_dim} "
        f"dim float32, {args.rounds} rounds of ucx_perftest {test} then {args.repeats} requests; medians over rounds "
        "(ratios: within each round); GB/s = 1e9 B/s"
    )
    labels = list(rows[0].get("ratio_to", {})) if rows else []
    if any("*" in label for label in labels):
        print("pt tcp: ucx_perftest as shipped; pt tcp*: with the UCX_TCP_* settings the hand-off runs with")
    head = "".join(f" {'pt ' + t:>9}" for t in labels) + "".join(f" {'vs ' + t:>8}" for t in labels)
    print(f"{'size MiB':>9} {'pdserve':>9}{head}  KV over")
    for r in rows:
        cells = "".join(f" {r[f'perftest_{t}_gbps']:9.3f}" for t in labels)
        cells += "".join(f" {r['ratio_to'][t]:8.0%}" for t in labels)
        print(f"{r['size_mib']:9g} {r['pdserve_gbps']:9.3f}{cells}  {r['transport']}")


def forwarded(args: argparse.Namespace) -> list[str]:
    """The command-line options of this bench that `args` sets to other than their defaults, to run it elsewhere."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    argv: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or value == action.default:
            continue
        argv += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    return argv


def main() -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench transfer", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
