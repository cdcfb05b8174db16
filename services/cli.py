"""The `pdserve` command: serve, offline, make-model, drain-node, bench."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module providing add_arguments(parser) and run(args) -> int, help); imported only when chosen
_COMMANDS = {
    "serve": ("services.serve", "run the router and the worker pools"),
    "offline": ("services.engine.offline", "run a JSONL batch through the offline engine"),
    "make-model": ("services.modelgen.cli", "write a random-initialised Hugging Face model directory"),
    "drain-node": ("services.drain", "drain this host's Ray node: its workers finish their requests, get no new ones"),
}
_BENCHES = {
    "offline": ("services.bench.offline", "pdserve's engine against transformers generate"),
    "transfer": ("services.bench.transfer", "KV hand-off bandwidth against ucx_perftest, and the TTFT breakdown"),
    "serve": ("services.bench.serve", "load generator: goodput under SLO against a gRPC or HTTP target"),
    "compare": ("services.bench.peers", "pdserve's serving modes beside llama.cpp's llama-server, same load"),
    "step": ("services.bench.step", "the engine's decode step at batch 1 and 32 against its roofline"),
}


def _chosen(argv: list[str]) -> tuple[str | None, str | None]:
    """The command (and bench) named on the command line: the first words that are not options."""
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words else None
    bench = words[1] if command == "bench" and len(words) > 1 else None
    return command, bench


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    command, bench_name = _chosen(argv)
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with disaggregated prefill and decode")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(subparsers: argparse._SubParsersAction, name: str, module: str, help_text: str, chosen: bool) -> None:
        p = subparsers.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        if chosen:  # only the chosen command's options are built: their imports can be heavy
            importlib.import_module(module).add_arguments(p)

    for name, (module, help_text) in _COMMANDS.items():
        add(sub, name, module, help_text, name == command)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in _BENCHES.items():
        add(bench, name, module, help_text, command == "bench" and name == bench_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
