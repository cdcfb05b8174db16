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
others are not read back. Each actor is pinned to a core of its own (see
`transfer_actors.pin_process`; `--no-pin` leaves them be); ucx_perftest runs as shipped.

The reference and the hand-off take turns: each round of a size runs ucx_perftest once per
transport, then `--repeats` requests, and the ratio is taken within the round. On a shared host
whose speed drifts by 2x over minutes, that keeps each ratio side by side; the table gives the
median over rounds of every column.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from typing import Any

from services.bench.perftest import MIB, run_perftest
from services.transfer.config import CUDA_UCX_TLS, DEFAULT_UCX_TLS, PROGRESS_MODES, TransferConfig
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
    parser.add_argument("--progress-mode", default="thread", choices=PROGRESS_MODES)
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
    parser.add_argument("--perftest-test", default="tag_bw", help="ucx_perftest test (tag_bw, ucp_put_bw, ...)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="per size: ucx_perftest once per transport, then --repeats requests"
    )
    parser.add_argument("--no-perftest", action="store_true", help="skip the ucx_perftest reference")
    parser.add_argument(
        "--no-pin", action="store_true", help="leave the two actors unpinned (by default each gets a core of its own)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")


class _Pair:
    """A prefill and a decode actor with a connection between them (Ray must be up)."""

    def __init__(self, args: argparse.Namespace, fp: KVFingerprint, sizes: list[int]) -> None:
        import ray

        from services.bench.transfer_actors import DecodeSide, PrefillSide

        config = TransferConfig(
            timeout_s=60.0,
            ucx_tls=args.ucx_tls,
            progress_mode=args.progress_mode,
            staging_mib=args.staging_mib,
            spin_us=args.spin_us,
        )
        self.fp = fp
        self.token_bytes = fp.num_layers * fp.payload_bytes(1)
        max_tokens = max(sizes) // self.token_bytes
        self.num_blocks = 2 * (max_tokens // fp.block_size + 1)
        decode: Any = ray.remote(num_cpus=1)(DecodeSide).remote(fp, config, self.num_blocks)
        cache_blocks = self.num_blocks if args.source == "cache" else 0
        prefill: Any = ray.remote(num_cpus=1)(PrefillSide).remote(fp, config, cache_blocks)
        self.decode, self.prefill = decode, prefill
        cpus = sorted(os.sched_getaffinity(0))
        if not args.no_pin and len(cpus) >= 2:
            ray.get([prefill.pin.remote({cpus[0]}), decode.pin.remote({cpus[1]})])
        self.peer = ray.get(decode.start.remote())
        if ray.get(prefill.start.remote()) != bool(cache_blocks):
            raise RuntimeError("the prefill actor could not allocate its KV cache in shared memory")
        self.rng = random.Random(0)
        self.requests = 0

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
            t1 = ray.get(self.decode.wait.remote(rid))
            if rep:
                ray.get(self.decode.forget.remote(rid))
                samples.append(tokens * self.token_bytes / (t1 - t0) / 1e9)
            elif not ray.get(self.decode.check.remote(rid, size)):  # the first of each size is checked
                raise RuntimeError(f"a {size}-byte request's KV did not land exactly")
        return statistics.median(samples)

    def close(self) -> None:
        import ray

        ray.get([self.prefill.close.remote(), self.decode.close.remote()])


def _measure(args: argparse.Namespace, fp: KVFingerprint, sizes: list[int]) -> list[dict[str, Any]]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pair = _Pair(args, fp, sizes)
        rows = []
        for size in sizes:
            rounds = []
            for _ in range(args.rounds):
                reference = {} if args.no_perftest else {
                    tls: run_perftest(size, tls, args.perftest_test).gbps for tls in ("posix", "tcp")
                }  # fmt: skip
                gbps = pair.bandwidth(size, args.repeats)
                rounds.append((gbps, reference))
            row: dict[str, Any] = {"size_mib": size / MIB, "pdserve_gbps": statistics.median(g for g, _ in rounds)}
            if not args.no_perftest:
                for tls in ("posix", "tcp"):
                    row[f"perftest_{tls}_gbps"] = statistics.median(ref[tls] for _, ref in rounds)
                row["ratio_to_best"] = statistics.median(g / max(ref.values()) for g, ref in rounds)
                row["rounds"] = [
                    {"pdserve_gbps": g, **{f"perftest_{t}_gbps": v for t, v in ref.items()}} for g, ref in rounds
                ]
            rows.append(row)
        pair.close()
        return rows
    finally:
        ray.shutdown()


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
    print(
        f"KV hand-off from {args.source}, {args.layers} layers x {args.kv_heads} kv heads x {args.head_dim} dim "
        "float32, "
        f"{args.rounds} rounds of ucx_perftest {args.perftest_test} then {args.repeats} requests; medians over rounds "
        "(ratio: within each round); GB/s = 1e9 B/s"
    )
    print(f"{'size MiB':>9} {'pdserve':>9} {'pt posix':>9} {'pt tcp':>9} {'ratio':>6}")
    for r in rows:
        ref = (
            f" {r['perftest_posix_gbps']:9.2f} {r['perftest_tcp_gbps']:9.2f} {r['ratio_to_best']:6.0%}"
            if "ratio_to_best" in r
            else ""
        )
        print(f"{r['size_mib']:9g} {r['pdserve_gbps']:9.2f}{ref}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench transfer", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
