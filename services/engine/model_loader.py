"""Loads Hugging Face safetensors (single file or sharded) into the engine's model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from services.dtypes import TORCH_DTYPES  # model_runner imports it from here too
from services.engine.errors import UnsupportedModel
from services.engine.model_config import ModelConfig
from services.engine.models.llama import LlamaForCausalLM

# HF name suffix -> (our parameter suffix, shard index within a fused parameter)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _shard_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused.endswith("qkv_proj"):
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
    return [cfg.intermediate_size, cfg.intermediate_size]


def load_model(cfg: ModelConfig, device: str, dtype_name: str) -> LlamaForCausalLM:
    dtype = TORCH_DTYPES[dtype_name]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)  # allocated once, in the final dtype
    model = model.to_empty(device=device)
    model.get_buffer("cos_sin").copy_(_cos_sin(cfg))
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for hf_name, tensor in _iter_tensors(Path(cfg.path)):
        name = hf_name.removeprefix("model.")
        if "rotary_emb" in name:
            continue
        fused_target = next(((k, v) for k, v in _FUSED.items() if f".{k}." in f".{name}"), None)
        if fused_target is not None:
            hf_part, (ours, shard) = fused_target
            name = name.replace(hf_part, ours)
            sizes = _shard_sizes(cfg, ours)
            offset = sum(sizes[:shard])
            if name not in params:
                raise UnsupportedModel(f"unexpected weight {hf_name} in {cfg.path}")
            params[name].data[offset : offset + sizes[shard]].copy_(tensor)
            loaded.add(f"{name}#{shard}")
            continue
        if name not in params:
            raise UnsupportedModel(f"unexpected weight {hf_name} in {cfg.path}")
        params[name].data.copy_(tensor)
        loaded.add(name)
    if cfg.tie_word_embeddings or "lm_head.weight" not in loaded:
        if not cfg.tie_word_embeddings:
            raise UnsupportedModel(f"{cfg.path} has no lm_head.weight and does not tie its embeddings")
        model.lm_head.weight = model.embed_tokens.weight
        loaded.add("lm_head.weight")
    expected: set[str] = set()
    for name in params:
        fused = next((ours for ours, _ in _FUSED.values() if name.startswith("layers.") and ours in name), None)
        if fused is not None:
            expected.update(f"{name}#{i}" for i in range(len(_shard_sizes(cfg, fused))))
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise UnsupportedModel(f"{cfg.path} is missing weights: {', '.join(missing[:5])}")
    return model.eval()


def _cos_sin(cfg: ModelConfig) -> torch.Tensor:
    from kernels.rotary import build_cos_sin_cache

    return build_cos_sin_cache(cfg.head_dim, cfg.max_model_len, cfg.rope_theta, cfg.rope_scaling, torch.float32)
