"""`pdserve bench transfer`: KV hand-off bandwidth between two Ray actors, beside ucx_perftest.

One request is every layer of a token range, sent layer by layer from a "compute" thread with
`KVSender.submit`, exactly as a prefill worker does, into a decode actor's real kv_cache at random
block ids. A request's time runs from the first layer's submission (prefill actor) to
the return of `KVReceiver.wait` (decode actor), both on the host's monotonic clock.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from typing import Any

from services.transfer.config import DEFAULT_UCX_TLS, PROGRESS_MODES, TransferConfig
from services.transfer.fingerprint import KVFingerprint
from services.transfer.perftest import MIB, run_perftest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes-mib", default="1,2,4,8,16,32,64", help="per-request KV sizes in MiB")
    parser.add_argument("--repeats", type=int, default=7, help="timed requests per size (median reported)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--ucx-tls", default=DEFAULT_UCX_TLS)
    parser.add_argument("--progress-mode", default="thread", choices=PROGRESS_MODES)
    parser.add_argument(
        "--staging-mib", type=int, default=TransferConfig.staging_mib, help="0: register the tensors in place"
    )
    parser.add_argument("--perftest-test", default="tag_bw", help="ucx_perftest test (tag_bw, ucp_put_bw, ...)")
    parser.add_argument(
        "--perftest-runs", type=int, default=3, help="ucx_perftest runs per size and transport (median)"
    )
    parser.add_argument("--no-perftest", action="store_true", help="skip the ucx_perftest reference")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")


def _pdserve_bandwidth(args: argparse.Namespace, fp: KVFingerprint, sizes: list[int]) -> dict[int, float]:
    import ray

    from services.transfer.bench_actors import DecodeSide, PrefillSide

    config = TransferConfig(
        timeout_s=60.0, ucx_tls=args.ucx_tls, progress_mode=args.progress_mode, staging_mib=args.staging_mib
    )
    token_bytes = fp.num_layers * fp.payload_bytes(1)
    max_tokens = max(sizes) // token_bytes
    num_blocks = 2 * (max_tokens // fp.block_size + 1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        decode: Any = ray.remote(num_cpus=1)(DecodeSide).remote(fp, config, num_blocks)
        prefill: Any = ray.remote(num_cpus=1)(PrefillSide).remote(fp, config)
        peer = ray.get(decode.start.remote())
        rng = random.Random(0)
        results: dict[int, float] = {}
        for size in sizes:
            tokens = max(1, size // token_bytes)
            ray.get(prefill.prepare.remote(tokens, size))
            samples = []
            for rep in range(args.repeats + 1):  # the first one warms up buffers and registrations
                rid = f"bench-{size}-{rep}"
                blocks = rng.sample(range(num_blocks), (tokens + fp.block_size - 1) // fp.block_size)
                ray.get(decode.expect.remote(rid, blocks, 0, tokens))
                done = decode.wait.remote(rid)
                t0 = ray.get(prefill.send_request.remote(peer, rid, 0, tokens, size))
                t1 = ray.get(done)
                ray.get(decode.read.remote(rid))
                if rep:
                    samples.append(tokens * token_bytes / (t1 - t0) / 1e9)
            results[size] = statistics.median(samples)
        ray.get([prefill.close.remote(), decode.close.remote()])
        return results
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> int:
    try:
        sizes = [int(float(s) * MIB) for s in args.sizes_mib.split(",") if s.strip()]
        fp = KVFingerprint("bench", "float32", args.block_size, args.layers, args.kv_heads, args.head_dim)
        if not sizes or min(sizes) < fp.num_layers * fp.payload_bytes(1) or args.repeats < 1:
            raise ValueError("need --repeats >= 1 and sizes of at least one token of every layer")
        if args.perftest_runs < 1:
            raise ValueError("need --perftest-runs >= 1")
        TransferConfig(ucx_tls=args.ucx_tls, staging_mib=args.staging_mib)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    # ucx_perftest first, while nothing else runs: Ray's processes take a while to go after shutdown.
    # Its figure at one size swings by 2x from run to run here (cache effects), hence the median.
    reference = {
        size: {
            tls: statistics.median(run_perftest(size, tls, args.perftest_test).gbps for _ in range(args.perftest_runs))
            for tls in ("posix", "tcp")
        }
        for size in ([] if args.no_perftest else sizes)
    }
    pdserve = _pdserve_bandwidth(args, fp, sizes)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        row: dict[str, Any] = {"size_mib": size / MIB, "pdserve_gbps": pdserve[size]}
        if size in reference:
            row.update({f"perftest_{tls}_gbps": gbps for tls, gbps in reference[size].items()})
            row["ratio_to_best"] = pdserve[size] / max(reference[size].values())
        rows.append(row)
    _print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2, default=str)
    return 0


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"KV hand-off, {args.layers} layers x {args.kv_heads} kv heads x {args.head_dim} dim float32, "
        f"median of {args.repeats}; ucx_perftest {args.perftest_test}, median of {args.perftest_runs}; GB/s = 1e9 B/s"
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
