"""``pdserve make-model``: write a random-initialised Llama/Mistral/Qwen2 model as a Hugging Face directory.

These machines cannot download weights, so tests, benchmarks and ``pdserve serve`` run on models written here.
A directory holds config.json, generation_config.json, model.safetensors (or shards plus
model.safetensors.index.json), and the tokenizer files from :mod:`services.engine.tokenizer_train`. Both
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load it with no missing or unexpected weights.
The weights themselves come from :mod:`services.engine.random_weights`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.engine.random_weights import SAFETENSORS_DTYPES, tensor_plan, write_weights
from services.engine.tokenizer_train import MIN_VOCAB_SIZE, write_tokenizer_files
from services.env import Env

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "shard_size_bytes",
)
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


@dataclass(frozen=True)
class ModelPreset:
    """The shape and numeric format of a generated model. Every field can be overridden in :func:`make_model`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qwen2: bool = False
    mistral: bool = False
    dtype: str = "float32"
    shard_size_bytes: int = 5 * 10**9

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + 256 special tokens + merges)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(SAFETENSORS_DTYPES)}, got {self.dtype!r}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict or None, got {self.rope_scaling!r}")
        for name in ("tie_word_embeddings", "qwen2", "mistral"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.qwen2 and self.mistral:
            raise ValueError("qwen2 and mistral are different families; set at most one")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(spec.shape) for spec in tensor_plan(self))


LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, ModelPreset] = {
    # ~21M parameters: the test and default model.
    "tiny": ModelPreset(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    # ~101M parameters.
    "small": ModelPreset(
        vocab_size=16384,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    ),
    # The real Llama-3-8B shape, random bf16 (never built in tests).
    "llama3-8b": ModelPreset(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE_SCALING,
        dtype="bfloat16",
    ),
}

OVERRIDABLE = frozenset(f.name for f in dataclasses.fields(ModelPreset))


def resolve_preset(preset: str, overrides: dict[str, Any]) -> ModelPreset:
    """Apply ``overrides`` to a named preset; unknown names raise ``ValueError`` listing the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - OVERRIDABLE)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {sorted(OVERRIDABLE)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


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


def pdserve_home() -> Path:
    """``$PDSERVE_HOME``, default ``~/.cache/pdserve`` (read at each call, so a caller may change it)."""
    return Env.read().home.expanduser()


def default_model_dir() -> Path:
    """The tiny preset with seed 0 under ``$PDSERVE_HOME/models/tiny-seed0``, generated on first use.

    Safe when processes race: each builds privately and the first rename wins; losers use the winner's copy.
    """
    target = pdserve_home() / "models" / "tiny-seed0"
    if target.exists() and not _is_current(target):
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(target, stale)
        except OSError:
            pass  # another process moved or replaced it already
        shutil.rmtree(stale, ignore_errors=True)
    if _is_current(target):
        return target
    try:
        make_model(target, "tiny", 0)
    except FileExistsError:
        if not _is_current(target):
            raise
    return target


def _is_current(model_dir: Path) -> bool:
    if not is_complete(model_dir):
        return False
    provenance = json.loads((model_dir / PROVENANCE_FILE).read_text())
    return bool(provenance.get("generator_version") == GENERATOR_VERSION)


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
    print(f"wrote {args.preset} model ({spec.num_parameters / 1e6:.1f}M parameters, {spec.dtype}) to {out}")
    return 0


__all__ = ["PRESETS", "ModelPreset", "add_arguments", "default_model_dir", "make_model", "run"]
