"""Llama-architecture decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Tokens of the whole batch are flattened to one [T] axis; `AttentionBatch` says which rows
belong to which sequence. q/k/v and gate/up projections are fused into single matmuls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

import kernels.cpu_native as cpu_native
from kernels.activation import silu_and_mul
from kernels.attention import paged_attention
from kernels.cpu_layers import DecodeLayers, LayerWeights
from kernels.cpu_linear import PackedLinear, choose_few_rows, pack_linears
from kernels.rmsnorm import rms_norm
from kernels.rope_store import rotate_and_store
from kernels.rotary import build_cos_sin_cache
from services.engine.model_config import ModelConfig

log = logging.getLogger(__name__)

# Called after each layer's K/V for the batch is written: (layer, k [T, Hk, D], v [T, Hk, D]).
LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int64
    context_lens: torch.Tensor  # [B] int64
    query_start_loc: torch.Tensor  # [B + 1] int64


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, batch: AttentionBatch, kv_layer: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = rotate_and_store(q, k, v, batch.positions, cos_sin, kv_layer, batch.slot_mapping)
        out = paged_attention(q, kv_layer, batch.block_tables, batch.context_lens, batch.query_start_loc, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: AttentionBatch,
        kv_layer: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual)
        x, k, v = self.self_attn(x, batch, kv_layer, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual, k, v


    def weights_for_c(self) -> LayerWeights | None:
        """This layer's weights for the C decode path (kernels/cpu_layers.py); None unless every product keeps a
        row-major weight (PackedLinear.row_major)."""
        attn, mlp = self.self_attn, self.mlp
        qkv, o, gate_up, down = (p.row_major if isinstance(p, PackedLinear) else None
                                 for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        if qkv is None or o is None or gate_up is None or down is None:
            return None
        return LayerWeights(input_norm=self.input_layernorm.weight.data, qkv=qkv, qkv_bias=attn.qkv_proj.bias, o=o,
                            post_norm=self.post_attention_layernorm.weight.data, gate_up=gate_up,
                            gate_up_bias=mlp.gate_up_proj.bias, down=down, down_bias=mlp.down_proj.bias)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer(
            "cos_sin",
            build_cos_sin_cache(cfg.head_dim, cfg.max_model_len, cfg.rope_theta, cfg.rope_scaling, torch.float32),
            persistent=False,
        )
        self.decode_layers: DecodeLayers | None = None  # the C path of steps of a few decodes (prepare_cpu)

    def forward(
        self,
        input_ids: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
        on_layer_kv: LayerKVHook | None = None,
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden]; kv_cache is [layers, 2, blocks, block_size, Hk, D]."""
        x = self.embed_tokens(input_ids)
        fast = self.decode_layers
        if fast is not None and on_layer_kv is None and fast.fits(x, batch.context_lens, kv_cache):
            return fast(x, batch.positions, batch.slot_mapping, batch.block_tables, batch.context_lens, kv_cache)
        residual: torch.Tensor | None = None
        cos_sin = self.cos_sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            x, residual, k, v = layer(x, residual, batch, kv_cache[i], cos_sin)
            if on_layer_kv is not None:
                on_layer_kv(i, k, v)
        x, _ = self.norm(x, residual)
        return x

    def prepare_cpu(self) -> None:
        """Readies the model for CPU steps: builds the CPU kernels now (about a second, once per source) rather
        than in the first step, prepacks each float32 projection for oneDNN, and picks the products for steps of
        a few rows on this CPU (kernels/cpu_linear.py). A projection left unpacked stores its [out, in] weight
        as the transpose of a contiguous [in, out] tensor, so that F.linear hands MKL a plain x @ W product,
        whose matrix-vector form streams the weights about 1.7x faster at batch 1 and 2. A tied lm_head gets a
        packed copy; the embedding keeps its layout, which lookups need.
        """
        cpu_native.library()
        pack_linears(self)
        few_rows, medians = choose_few_rows(self)
        log.info("products of 1 to %d rows take the few-rows kernel, at %d threads (rows: packed / kernel ms, "
                 "the projections once: %s)", few_rows, torch.get_num_threads(),
                 ", ".join(f"{rows}: {p * 1e3:.2f} / {k * 1e3:.2f}" for rows, (p, k) in medians.items()))
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight is not self.embed_tokens.weight:
                module.weight.data = module.weight.data.t().contiguous().t()
        self.decode_layers = self._decode_layers(few_rows)

    def _decode_layers(self, few_rows: int) -> DecodeLayers | None:
        """The C path of decode steps of up to `few_rows` rows (kernels/cpu_layers.py), over the row-major
        weights of the few-rows products; None where those are not kept."""
        found = [cast(DecoderLayer, layer).weights_for_c() for layer in self.layers]
        weights = [w for w in found if w is not None]
        if not few_rows or len(weights) < len(found):
            return None
        cfg = self.cfg
        return DecodeLayers(weights, self.norm.weight.data, cast(torch.Tensor, self.cos_sin), cfg.num_heads,
                            cfg.num_kv_heads, cfg.rms_norm_eps, cfg.head_dim**-0.5, few_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
