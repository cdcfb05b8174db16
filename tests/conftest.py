"""Fixtures shared by every test folder.

`make_test_model(preset="tiny", seed=0, **overrides)` writes a random model with
`services.modelgen.build.make_model` once per session and shape, and returns its directory. The tiny
preset with no overrides is the user-wide default model (`default_model_dir()`, generated once
and kept under $PDSERVE_HOME), so the many tests that use it share one copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ModelFactory = Callable[..., Path]

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMTOOL = REPO_ROOT / ".tools" / "promtool"

# A small shape that loads and runs in well under a second: 2 layers, hidden 128, GQA 4/2.
SMALL_MODEL: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Prometheus' promtool, installed by `make setup` (scripts/install_promtool.sh) without a server."""
    if not PROMTOOL.is_file():
        pytest.fail(f"promtool not found at {PROMTOOL}; run `make setup` or "
                    f"`bash scripts/install_promtool.sh .tools` from {REPO_ROOT}")
    return PROMTOOL


@pytest.fixture(scope="session")
def make_test_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """Factory of model directories, cached per (preset, seed, overrides) for the session."""
    from services.modelgen.build import make_model
    from services.modelgen.default_model import default_model_dir

    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def factory(preset: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
        if preset == "tiny" and seed == 0 and not overrides:
            return default_model_dir()
        key = json.dumps([preset, seed, overrides], sort_keys=True)
        if key not in cache:
            cache[key] = make_model(root / f"m{len(cache)}-{preset}-s{seed}", preset, seed, **overrides)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model(make_test_model: ModelFactory) -> Path:
    """The tiny preset (4 layers, hidden 512, GQA 8/4, vocab 8192)."""
    return make_test_model()


@pytest.fixture(scope="session")
def small_model(make_test_model: ModelFactory) -> Path:
    """A 2-layer, hidden-128, GQA, untied Llama: fast enough for exhaustive engine tests."""
    return make_test_model(**SMALL_MODEL)


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Runs a module's torch work on one intra-op thread, then restores the setting.

    The CI box has two cores shared by every test process; with two threads, small ops spend
    most of their time waiting at the thread-pool barrier for a descheduled peer.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
