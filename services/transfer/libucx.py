"""Where the libucx wheel lives (ucxx-cu12 installs it): the UCX the data path builds against and loads."""

from __future__ import annotations

from pathlib import Path


def libucx_dir() -> Path:
    """The libucx wheel's folder (holds include/, lib/ and bin/ucx_perftest)."""
    import libucx

    return Path(libucx.__file__).resolve().parent
