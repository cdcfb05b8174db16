"""The built-in default model: the tiny preset with seed 0, generated on first use under ``$PDSERVE_HOME``."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from services.env import Env
from services.modelgen.build import is_current, make_model


def pdserve_home() -> Path:
    """``$PDSERVE_HOME``, default ``~/.cache/pdserve`` (read at each call, so a caller may change it)."""
    return Env.read().home.expanduser()


def default_model_dir() -> Path:
    """The tiny preset with seed 0 under ``$PDSERVE_HOME/models/tiny-seed0``, generated on first use.

    Safe when processes race: each builds privately and the first rename wins; losers use the winner's copy.
    """
    target = pdserve_home() / "models" / "tiny-seed0"
    if target.exists() and not is_current(target):
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(target, stale)
        except OSError:
            pass  # another process moved or replaced it already
        shutil.rmtree(stale, ignore_errors=True)
    if is_current(target):
        return target
    try:
        make_model(target, "tiny", 0)
    except FileExistsError:
        if not is_current(target):
            raise
    return target


def resolve_model(model: str | None) -> str:
    """``model`` itself when given, else the default model's directory (generated first if missing)."""
    return model if model is not None else str(default_model_dir())
