"""``pdserve make-model``: write a random-initialised Llama/Qwen2 model as a Hugging Face directory.

These machines cannot download weights, so tests, benchmarks and ``pdserve serve`` run on models written here.
A directory holds config.json, generation_config.json, model.safetensors (or shards plus
model.safetensors.index.json), and the tokenizer files from :mod:`services.engine.tokenizer_train`. Both
``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load it with no missing or unexpected weights.

Weights are seeded per tensor (from ``seed`` and the tensor's name), so the same seed gives identical bytes,
and sharding never changes values. They are drawn and written chunk by chunk straight into the safetensors
files, so memory stays bounded even for the 8B shape. Init scales are chosen so that greedy decoding is
well-conditioned: unit-RMS activations through every projection, and logits with a standard deviation of
about ``LOGIT_STD``, which keeps the top-1/top-2 logit gap far above float32 noise. RMSNorm weights are drawn
around 1 (not exactly 1), so an engine that forgets to apply them disagrees with transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from services.engine.tokenizer_train import MIN_VOCAB_SIZE, write_tokenizer_files

LOGIT_STD = 4.0
NORM_WEIGHT_SPREAD = 0.25  # RMSNorm weights ~ U(1 - spread, 1 + spread)
# q/k biases shape attention; a v bias passes through softmax unchanged and becomes a constant push toward a
# few tokens at every position, so it stays small.
QKV_BIAS_STD = {"q_proj": 0.5, "k_proj": 0.5, "v_proj": 0.1}
# With tied embeddings the input embedding leaks into the logits (a token votes for itself) and greedy output
# repeats one token; larger attention/MLP outputs drown that self-vote. Measured: 24-36 distinct of 48 tokens.
TIED_RESIDUAL_GAIN = 8.0
SPECIAL_ROW_SCALE = 0.25  # output rows of special tokens: rarely the argmax, as in a trained model
_CHUNK_ELEMENTS = 1 << 24
_DTYPES: dict[str, tuple[torch.dtype, str]] = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16")}
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
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict or None, got {self.rope_scaling!r}")
        for name in ("tie_word_embeddings", "qwen2"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

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


@dataclass(frozen=True)
class TensorSpec:
    """One weight to generate: ``kind`` is "normal" (N(0, std^2)), "norm" (around 1) or "bias" (N(0, std^2)).

    Rows from ``scaled_rows_from`` on are multiplied by ``SPECIAL_ROW_SCALE`` (the special-token block of the
    output embedding).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    std: float = 0.0
    scaled_rows_from: int | None = None


def tensor_plan(spec: ModelPreset, special_start: int | None = None) -> list[TensorSpec]:
    """Every weight, with HF Llama/Qwen2 names, in the order written to disk.

    ``special_start`` is the first special-token id; those rows of the output embedding are damped.
    """
    h, q_out, kv_out = (
        spec.hidden_size,
        spec.num_attention_heads * spec.head_dim,
        spec.num_key_value_heads * spec.head_dim,
    )
    embed_std = LOGIT_STD / math.sqrt(h) if spec.tie_word_embeddings else 1.0
    gain = TIED_RESIDUAL_GAIN if spec.tie_word_embeddings else 1.0
    tied_start = special_start if spec.tie_word_embeddings else None
    plan = [TensorSpec("model.embed_tokens.weight", (spec.vocab_size, h), "normal", embed_std, tied_start)]
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        plan.append(TensorSpec(f"{p}.input_layernorm.weight", (h,), "norm"))
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            plan.append(TensorSpec(f"{p}.self_attn.{proj}.weight", (out, h), "normal", 1 / math.sqrt(h)))
            if spec.qwen2:
                plan.append(TensorSpec(f"{p}.self_attn.{proj}.bias", (out,), "bias", QKV_BIAS_STD[proj]))
        plan.append(TensorSpec(f"{p}.self_attn.o_proj.weight", (h, q_out), "normal", gain / math.sqrt(q_out)))
        plan.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), "norm"))
        inter = spec.intermediate_size
        plan.append(TensorSpec(f"{p}.mlp.gate_proj.weight", (inter, h), "normal", 1 / math.sqrt(h)))
        plan.append(TensorSpec(f"{p}.mlp.up_proj.weight", (inter, h), "normal", 1 / math.sqrt(h)))
        plan.append(TensorSpec(f"{p}.mlp.down_proj.weight", (h, inter), "normal", gain / math.sqrt(inter)))
    plan.append(TensorSpec("model.norm.weight", (h,), "norm"))
    if not spec.tie_word_embeddings:
        plan.append(
            TensorSpec("lm_head.weight", (spec.vocab_size, h), "normal", LOGIT_STD / math.sqrt(h), special_start)
        )
    return plan


def _tensor_chunks(t: TensorSpec, seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Deterministic values for ``t``, yielded in row chunks of at most ~``_CHUNK_ELEMENTS`` elements."""
    digest = hashlib.sha256(f"pdserve-make-model:{seed}:{t.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    row = math.prod(t.shape[1:])
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // row)
    for start in range(0, t.shape[0], rows_per_chunk):
        shape = (min(rows_per_chunk, t.shape[0] - start), *t.shape[1:])
        if t.kind == "norm":
            x = 1 + NORM_WEIGHT_SPREAD * (2 * torch.rand(shape, generator=gen) - 1)
        else:
            x = torch.randn(shape, generator=gen) * t.std
            if t.scaled_rows_from is not None and start + shape[0] > t.scaled_rows_from:
                x[max(0, t.scaled_rows_from - start) :] *= SPECIAL_ROW_SCALE
        yield x.to(dtype).contiguous()


def _plan_shards(plan: list[TensorSpec], itemsize: int, shard_size: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for t in plan:
        nbytes = math.prod(t.shape) * itemsize
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += nbytes
    return shards


def _write_safetensors(f: BinaryIO, tensors: list[TensorSpec], spec: ModelPreset, seed: int, preset: str) -> int:
    """Stream ``tensors`` into ``f`` in the safetensors format; returns the number of data bytes."""
    dtype, st_dtype = _DTYPES[spec.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "pdserve_preset": preset, "pdserve_seed": str(seed)}}
    offset = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        header[t.name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
        for chunk in _tensor_chunks(t, seed, dtype):
            f.write(chunk.view(torch.uint8).numpy().data)
    return offset


def _write_weights(out_dir: Path, spec: ModelPreset, seed: int, preset: str, special_start: int) -> None:
    plan = tensor_plan(spec, special_start)
    itemsize = torch.empty((), dtype=_DTYPES[spec.dtype][0]).element_size()
    shards = _plan_shards(plan, itemsize, spec.shard_size_bytes)
    if len(shards) == 1:
        with open(out_dir / "model.safetensors", "wb") as f:
            _write_safetensors(f, plan, spec, seed, preset)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with open(out_dir / name, "wb") as f:
            total += _write_safetensors(f, shard, spec, seed, preset)
        weight_map.update({t.name: name for t in shard})
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _config(spec: ModelPreset, bos: int, eos: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if spec.qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if spec.qwen2 else "llama",
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
    _write_weights(out_dir, spec, seed, preset, special_start=ids.bos)


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
    """``$PDSERVE_HOME``, default ``~/.cache/pdserve``."""
    return Path(os.environ.get("PDSERVE_HOME") or Path.home() / ".cache" / "pdserve").expanduser()


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
