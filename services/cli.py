"""The `pdserve` command: serve, offline, make-model, bench."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module providing add_arguments(parser) and run(args) -> int; imported only when chosen
_COMMANDS = {
    "serve": ("services.serve", "run the router and the worker pools"),
    "offline": ("services.engine.offline", "run a JSONL batch through the offline engine"),
    "make-model": ("services.engine.make_model", "write a random-initialised Hugging Face model directory"),
}
_BENCHES = {
    "offline": ("services.bench.offline", "pdserve's engine against transformers generate"),
    "transfer": ("services.transfer.bench", "KV hand-off bandwidth against ucx_perftest, and the TTFT breakdown"),
    "serve": ("services.bench.serve", "load generator: goodput under SLO against a gRPC or HTTP target"),
}


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    parser.set_defaults(_module=module)
    if name in sys.argv:  # build the options of the chosen command only: its imports can be heavy
        importlib.import_module(module).add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with disaggregated prefill and decode")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        _add(sub, name, module, help_text)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in _BENCHES.items():
        _add(bench, name, module, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = ["pdserve", *argv]
    args = build_parser().parse_args(sys.argv[1:])
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
