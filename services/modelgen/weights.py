"""Seeded random weights for a generated model, streamed chunk by chunk into safetensors files.

Weights are seeded per tensor (from the seed and the tensor's name), so the same seed gives identical bytes
and sharding never changes values; memory stays bounded even for the 8B shape. Init scales keep greedy
decoding well-conditioned: unit-RMS activations through every projection, and logits with a standard
deviation of about LOGIT_STD, which keeps the top-1/top-2 logit gap far above float32 noise. RMSNorm weights
are drawn around 1 (not exactly 1), so an engine that forgets to apply them disagrees with transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from services.modelgen.preset import SAFETENSORS_DTYPES, ModelPreset

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


def num_parameters(spec: ModelPreset) -> int:
    return sum(math.prod(t.shape) for t in tensor_plan(spec))


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
    dtype, st_dtype = getattr(torch, spec.dtype), SAFETENSORS_DTYPES[spec.dtype]
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


def write_weights(out_dir: Path, spec: ModelPreset, seed: int, preset: str, special_start: int) -> None:
    plan = tensor_plan(spec, special_start)
    itemsize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
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
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
