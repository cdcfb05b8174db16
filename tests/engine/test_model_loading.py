"""The loader takes Llama-family directories and refuses anything else with a message naming what it supports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from services.engine.errors import UnsupportedModel
from services.engine.model_config import load_model_config


@pytest.fixture
def model_copy(small_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(small_model, target)
    return target


def _edit_config(model: Path, **changes: object) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes",
    [
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
        {"hidden_act": "gelu"},
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    ],
    ids=["other-architecture", "other-activation", "other-rope"],
)
def test_unsupported_models_are_refused_by_name(model_copy: Path, changes: dict[str, object]) -> None:
    _edit_config(model_copy, **changes)
    with pytest.raises(UnsupportedModel, match="supported: Llama-architecture"):
        load_model_config(model_copy)


def test_a_directory_without_weights_is_refused(model_copy: Path) -> None:
    for weights in model_copy.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UnsupportedModel, match="no \\*.safetensors"):
        load_model_config(model_copy)


def test_mistral_sliding_window_caps_the_context(model_copy: Path) -> None:
    _edit_config(model_copy, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=512,
                 max_position_embeddings=4096)
    config = load_model_config(model_copy)
    assert config.architecture == "MistralForCausalLM" and config.max_model_len == 512
