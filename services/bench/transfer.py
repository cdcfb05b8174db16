"""`pdserve bench transfer`: KV hand-off bandwidth beside ucx_perftest, then the TTFT breakdown of a long prompt."""

from __future__ import annotations

import argparse

from services.bench import bandwidth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bandwidth.add_arguments(parser)
    parser.add_argument("--model", default=None, help="model for the TTFT breakdown (default: the tiny preset)")
    parser.add_argument("--ttft-prompt-len", type=int, default=1000)
    parser.add_argument("--ttft-repeats", type=int, default=5)
    parser.add_argument("--no-ttft", action="store_true", help="skip the TTFT breakdown")


def run(args: argparse.Namespace) -> int:
    status = bandwidth.run(args)
    if status or args.no_ttft:
        return status
    from services.bench.ttft import format_breakdown, run_breakdown

    print()
    print(format_breakdown(run_breakdown(args.model, args.ttft_prompt_len, args.ttft_repeats), args.ttft_prompt_len))
    return 0
