"""Reads a Hugging Face model directory's config.json into a validated ModelConfig."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.engine.errors import UnsupportedModel

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SUPPORTED = (
    "supported: Llama-architecture decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) "
    "with SiLU MLPs, MHA or GQA, RoPE (default, linear or llama3 scaling), tied or untied embeddings, "
    "in single or sharded safetensors"
)


@dataclass(frozen=True)
class ModelConfig:
    path: str
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise UnsupportedModel(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads}); {_SUPPORTED}"
            )



def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModel(f"{path} has no config.json; expected a Hugging Face model directory ({_SUPPORTED})")
    cfg = json.loads(config_file.read_text())
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModel(f"model_type {model_type!r} / architectures {archs} are not supported; {_SUPPORTED}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r} is not supported; {_SUPPORTED}")
    if not list(path.glob("*.safetensors")):
        raise UnsupportedModel(f"{path} has no *.safetensors weights; {_SUPPORTED}")
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    max_len = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", model_type == "mistral")
    if window and uses_window and int(window) < max_len:
        # Inside the window, sliding-window attention equals full attention.
        max_len = int(window)
    eos_ids = _eos_token_ids(cfg, path / "generation_config.json")
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"rope_scaling type {kind!r} is not supported; {_SUPPORTED}")
    return ModelConfig(
        path=str(path),
        name=path.name,
        architecture=next(a for a in archs if a in SUPPORTED_ARCHITECTURES),
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        max_model_len=max_len,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
    )


def _eos_token_ids(cfg: dict[str, Any], generation_config: Path) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json together, as transformers' generate stops on both
    (Llama 3 instruct models list their end-of-turn token only in generation_config.json)."""
    ids: list[int] = []
    sources = [cfg.get("eos_token_id")]
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for eos in sources:
        for token in eos if isinstance(eos, list) else ([] if eos is None else [eos]):
            if int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)
