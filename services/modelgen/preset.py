"""The shape and numeric format of a generated model, and the named presets.

A leaf module: the tokenizer, weight and directory writers all import it, and it imports none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The smallest vocabulary the tokenizer can fill: 256 byte tokens, 256 special tokens, and room for merges.
MIN_VOCAB_SIZE = 1024
# dtype name -> safetensors dtype tag, for the dtypes a generated model can have.
SAFETENSORS_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16"}

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


@dataclass(frozen=True)
class ModelPreset:
    """The shape and numeric format of a generated model. Every field can be overridden in ``make_model``."""

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
