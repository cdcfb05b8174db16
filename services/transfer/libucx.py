"""Where the libucx wheel lives: the UCX that ucxx loads, whose headers and libraries the data path builds against."""

from __future__ import annotations

from pathlib import Path


def libucx_dir() -> Path:
    """The libucx wheel's folder (holds include/, lib/ and bin/ucx_perftest)."""
    import libucx

    return Path(libucx.__file__).resolve().parent
