"""``pdserve make-model``: write a random-initialised model of a named preset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.modelgen.build import make_model
from services.modelgen.preset import PRESETS
from services.modelgen.weights import num_parameters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``pdserve make-model``."""
    parser.add_argument("--out", required=True, type=Path, help="directory to create (must not exist or be empty)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    parser.add_argument("--seed", default=0, type=int, help="random seed for the weights (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Body of ``pdserve make-model``: 0 on success, 2 with a message on stderr for bad input."""
    try:
        out = make_model(args.out, args.preset, args.seed)
    except (ValueError, FileExistsError) as exc:
        print(f"pdserve make-model: error: {exc}", file=sys.stderr)
        return 2
    spec = PRESETS[args.preset]
    print(f"wrote {args.preset} model ({num_parameters(spec) / 1e6:.1f}M parameters, {spec.dtype}) to {out}")
    return 0
