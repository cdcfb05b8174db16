"""Reads a Hugging Face model directory into a validated ModelConfig.

config.json is parsed by transformers' ``AutoConfig``, as transformers itself does before running the model, so
files in the v4 layout hub checkpoints have (top-level ``rope_theta`` and ``rope_scaling``) and files written by
transformers 5 (``rope_parameters``) give the same ModelConfig, with the same defaults transformers fills in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.engine.errors import UnsupportedModel

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SUPPORTED = (
    "supported: Llama-architecture decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) "
    "with SiLU MLPs, MHA or GQA, full-width RoPE (default, linear, llama3 or yarn), tied or untied embeddings, "
    "unquantized, in single or sharded safetensors"
)
# The parameters each supported RoPE type reads besides rope_theta; which of them are required.
_ROPE_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}
# generation_config.json keys that become sampling defaults; the sampler-only ones are dropped when do_sample is
# false, since transformers then decodes greedily (it applies repetition_penalty either way).
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_GREEDY_KEPT_KEYS = ("repetition_penalty",)


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
    # {"rope_type": "default" | "linear" | "llama3" | "yarn", plus that type's parameters}; see kernels/rotary.py.
    rope_scaling: dict[str, Any]
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str
    # Sampling defaults the model's generation_config.json sets (only keys of SAMPLING_DEFAULT_KEYS it sets).
    generation_defaults: dict[str, float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise UnsupportedModel(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads}); {_SUPPORTED}"
            )

    def context_len(self, limit: int | None) -> int:
        """The context length to serve: the model's own (max_model_len), lowered to `limit` when one is set
        (EngineConfig.max_model_len). The engine and the router both use this."""
        return min(self.max_model_len, limit or self.max_model_len)


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    raw = _read_json(path / "config.json")
    if raw is None:
        raise UnsupportedModel(f"{path} has no config.json; expected a Hugging Face model directory ({_SUPPORTED})")
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModel(f"model_type {model_type!r} / architectures {archs} are not supported; {_SUPPORTED}")
    if not list(path.glob("*.safetensors")):
        raise UnsupportedModel(f"{path} has no *.safetensors weights; {_SUPPORTED}")
    cfg = _auto_config(path)
    _check_features(cfg, model_type)
    num_heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    max_positions = int(cfg.max_position_embeddings)
    max_len = max_positions
    window = getattr(cfg, "sliding_window", None)  # Qwen2's config sets it to None unless use_sliding_window
    if window and int(window) < max_len:
        # Inside the window, sliding-window attention equals full attention.
        max_len = int(window)
    rope = _rope_parameters(cfg, max_positions)
    generation = _read_json(path / "generation_config.json") or {}
    dtype = getattr(cfg, "dtype", None)
    return ModelConfig(
        path=str(path),
        name=path.name,
        architecture=next(a for a in archs if a in SUPPORTED_ARCHITECTURES),
        vocab_size=int(cfg.vocab_size),
        hidden_size=hidden,
        intermediate_size=int(cfg.intermediate_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or hidden // num_heads),
        max_model_len=max_len,
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=float(rope.pop("rope_theta")),
        rope_scaling=rope,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",  # Qwen2's q/k/v projections always have biases
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        # From the files, not the config object: transformers fills in a Llama's missing ids with 1 and 2.
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_token_ids(raw.get("eos_token_id"), generation.get("eos_token_id")),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        generation_defaults=generation_defaults(generation),
    )


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"{file} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{file} does not hold a JSON object")
    return data


def _auto_config(path: Path) -> Any:
    from transformers import AutoConfig  # heavy: loaded only when a model is read

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UnsupportedModel(f"transformers cannot read {path / 'config.json'}: {exc}; {_SUPPORTED}") from exc


def _check_features(cfg: Any, model_type: str) -> None:
    """Refuses, by name, what the engine's Llama model would compute differently from transformers."""
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r} is not supported; {_SUPPORTED}")
    quantization = getattr(cfg, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise UnsupportedModel(f"quantization_config (quant_method {method!r}) is not supported; {_SUPPORTED}")
    if model_type == "llama" and getattr(cfg, "attention_bias", False):
        # Llama's attention_bias puts a bias on o_proj too, which the engine's model does not have.
        raise UnsupportedModel(f"attention_bias=True (q/k/v/o biases) is not supported for Llama; {_SUPPORTED}")


def _rope_parameters(cfg: Any, max_positions: int) -> dict[str, Any]:
    """rope_theta, rope_type and that type's parameters, from the config transformers standardised."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if "rope_type" not in params:  # nested by layer type, or absent
        raise UnsupportedModel(f"rope_parameters {params!r} are not supported (one global RoPE expected); {_SUPPORTED}")
    kind = params["rope_type"]
    if kind not in _ROPE_PARAMETERS:
        raise UnsupportedModel(f"RoPE type {kind!r} is not supported; {_SUPPORTED}")
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModel(f"partial_rotary_factor {partial} is not supported (RoPE on part of each head); "
                               f"{_SUPPORTED}")
    required, optional = _ROPE_PARAMETERS[kind]
    rope: dict[str, Any] = {"rope_theta": float(params["rope_theta"]), "rope_type": kind}
    if kind == "yarn" and params.get("factor") is None and params.get("original_max_position_embeddings"):
        # As transformers: without a factor, YaRN stretches original_max_position_embeddings to the full context.
        rope["factor"] = max_positions / params["original_max_position_embeddings"]
    for key in required:
        if params.get(key) is not None and key not in rope:
            rope[key] = params[key]
    # Optional keys set to None stay: kernels/rotary.py reads them as transformers does.
    rope.update((key, params[key]) for key in optional if key in params)
    missing = [key for key in required if key not in rope]
    if missing:
        raise UnsupportedModel(f"RoPE type {kind!r} needs {', '.join(missing)} in rope_parameters; {_SUPPORTED}")
    return rope


def generation_defaults(generation_config: dict[str, Any]) -> dict[str, float | int]:
    """The sampling defaults a generation_config.json sets explicitly, as vLLM's ``get_diff_sampling_param``:
    keys of SAMPLING_DEFAULT_KEYS present with a value (transformers 5's GenerationConfig defaults them all to
    None). With ``do_sample: false`` transformers decodes greedily, so only repetition_penalty is kept."""
    greedy = generation_config.get("do_sample") is False
    defaults: dict[str, float | int] = {}
    for key in SAMPLING_DEFAULT_KEYS:
        value = generation_config.get(key)
        if value is None or (greedy and key not in _GREEDY_KEPT_KEYS):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UnsupportedModel(f"generation_config.json {key} must be a number, got {value!r}")
        defaults[key] = int(value) if key == "top_k" else float(value)
    return defaults


def _eos_token_ids(*sources: Any) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json together, as transformers' generate stops on both
    (Llama 3 instruct models list their end-of-turn token only in generation_config.json)."""
    ids: list[int] = []
    for eos in sources:
        for token in eos if isinstance(eos, list) else ([] if eos is None else [eos]):
            if int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)
