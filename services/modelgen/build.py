"""Write a random-initialised Llama/Mistral/Qwen2 model as a Hugging Face directory.

A directory holds config.json, generation_config.json, model.safetensors (or shards plus
model.safetensors.index.json), and the tokenizer files from :mod:`services.modelgen.tokenizer`. Both
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load it with no missing or unexpected weights.
The weights themselves come from :mod:`services.modelgen.weights`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from services.modelgen.preset import ModelPreset, resolve_preset
from services.modelgen.tokenizer import write_tokenizer_files
from services.modelgen.weights import write_weights

# Bump when the bytes written for a given preset and seed change, so cached default models are rebuilt.
GENERATOR_VERSION = 2
PROVENANCE_FILE = "pdserve_model.json"
_REQUIRED_FILES = (
    PROVENANCE_FILE,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _config(spec: ModelPreset, bos: int, eos: int) -> dict[str, Any]:
    family = "qwen2" if spec.qwen2 else "mistral" if spec.mistral else "llama"
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": spec.dtype,
        "use_cache": True,
    }
    if spec.qwen2:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.num_hidden_layers)
    elif spec.mistral:
        config.update(sliding_window=None)  # as Mistral 7B v0.2 and later
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _build(out_dir: Path, spec: ModelPreset, seed: int, preset: str, overrides: dict[str, Any]) -> None:
    provenance = {"generator_version": GENERATOR_VERSION, "preset": preset, "seed": seed, "overrides": overrides}
    _write_json(out_dir / PROVENANCE_FILE, provenance)
    ids = write_tokenizer_files(out_dir, spec.vocab_size, spec.max_position_embeddings, spec.qwen2)
    _write_json(out_dir / "config.json", _config(spec, ids.bos, ids.eos))
    _write_json(out_dir / "generation_config.json", {"bos_token_id": ids.bos, "eos_token_id": [ids.eos, ids.eot]})
    write_weights(out_dir, spec, seed, preset, special_start=ids.bos)


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds every file a generated model needs (all shards included)."""
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((model_dir / s).is_file() for s in shards)
    return (model_dir / "model.safetensors").is_file()


def is_current(model_dir: Path) -> bool:
    """True when ``model_dir`` is complete and was written by this version of the generator."""
    if not is_complete(model_dir):
        return False
    provenance = json.loads((model_dir / PROVENANCE_FILE).read_text())
    return bool(provenance.get("generator_version") == GENERATOR_VERSION)


def make_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a random model of ``preset`` (with ``overrides``) to ``out_dir`` and return its path.

    ``out_dir`` must not exist or be empty (``FileExistsError`` otherwise). Files are written to a temporary
    sibling directory that is renamed into place, so ``out_dir`` is either absent or complete.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    spec = resolve_preset(preset, overrides)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is meant to be shared
        _build(tmp, spec, seed, preset, overrides)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError as exc:
            raise FileExistsError(f"{out} was created by someone else while generating") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
