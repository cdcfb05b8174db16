"""Every layer of a decode step of a few rows in one C call (kernels/cpu_layers.py, cpu_layers.c) against the
model's own modules, which the engine tests hold to transformers."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu_linear as cpu_linear
import kernels.cpu_native as cpu_native
from services.engine.model_config import ModelConfig
from services.engine.models.llama import AttentionBatch, LlamaForCausalLM
from tests.kernel_cases import FP32_TOL

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

BLOCKS, BLOCK_SIZE, POSITIONS = 40, 8, 96


def small_model(head_dim: int, bias: bool, monkeypatch: pytest.MonkeyPatch) -> LlamaForCausalLM:
    """Two layers, random weights (norms included), readied for the CPU with the few-rows kernel kept for up to
    4 rows whatever the timing (so the C path exists)."""
    cfg = ModelConfig(path="", name="small", architecture="LlamaForCausalLM", vocab_size=101, hidden_size=96,
                      intermediate_size=80, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=head_dim,
                      max_model_len=POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
                      rope_scaling={"rope_type": "default"}, tie_word_embeddings=False, attention_bias=bias,
                      mlp_bias=bias, bos_token_id=None,
                      eos_token_ids=(0,), dtype="float32")  # fmt: skip
    torch.manual_seed(head_dim + bias)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight" or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (0 if name.endswith(".bias") else 1))
    monkeypatch.setattr(cpu_linear, "PACKED_MARGIN", 0.0)
    model.prepare_cpu()
    assert model.decode_layers is not None
    return model


def decode_step(model: LlamaForCausalLM, contexts: list[int], seed: int) -> tuple[torch.Tensor, AttentionBatch,
                                                                                   torch.Tensor]:
    """Token ids, the batch and a cache for one decode per context (the new token at the context's last
    position). Blocks are shuffled over the cache; the slots no context holds are NaN, which must never be read."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    cache = torch.randn(cfg.num_layers, 2, BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    per_seq = -(-max(contexts) // BLOCK_SIZE)
    blocks = torch.randperm(BLOCKS, generator=gen)[: per_seq * len(contexts)].view(len(contexts), per_seq)
    held = torch.zeros(BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    for b, n in enumerate(contexts):
        for p in range(n):
            held[blocks[b, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE] = True
    cache.view(cfg.num_layers, 2, BLOCKS * BLOCK_SIZE, -1)[:, :, ~held] = float("nan")
    positions = torch.tensor([n - 1 for n in contexts])
    slots = torch.stack([blocks[b, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for b, p in enumerate(positions)])
    batch = AttentionBatch(positions=positions, slot_mapping=slots, block_tables=blocks.contiguous(),
                           context_lens=torch.tensor(contexts), query_start_loc=torch.arange(len(contexts) + 1))
    return torch.randint(0, cfg.vocab_size, (len(contexts),), generator=gen), batch, cache


Outcome = tuple[torch.Tensor, torch.Tensor]  # the final hidden state, and the cache after the step


def both_paths(model: LlamaForCausalLM, ids: torch.Tensor, batch: AttentionBatch, cache: torch.Tensor,
               threads: int | None = None) -> tuple[Outcome, Outcome]:
    """(hidden, cache after) through the C path, then through the modules, from the same cache, on `threads`
    torch threads (default: as they are)."""
    fast, modules_cache = model.decode_layers, cache.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch.inference_mode():
            got = model(ids, batch, cache)
            model.decode_layers = None
            want = model(ids, batch, modules_cache)
    finally:
        model.decode_layers = fast
        torch.set_num_threads(before)
    return (got, cache), (want, modules_cache)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("contexts", [[1], [17], [9, 40], [5, 64, 23], [33, 8, 1, 50]])
@pytest.mark.parametrize(("head_dim", "bias"), [(16, False), (64, True)])
def test_the_c_path_matches_the_modules(contexts: list[int], head_dim: int, bias: bool, threads: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """1 to 4 decodes, contexts within one block and across several; head size 64 takes the kernel's fixed-size
    attention, 16 the general one; Qwen2's projection biases and Llama's mlp_bias."""
    assert cpu_native.library() is not None
    model = small_model(head_dim, bias, monkeypatch)
    ids, batch, cache = decode_step(model, contexts, seed=len(contexts))
    (got, got_cache), (want, want_cache) = both_paths(model, ids, batch, cache, threads)
    torch.testing.assert_close(got, want, **FP32_TOL)
    torch.testing.assert_close(got_cache, want_cache, equal_nan=True, **FP32_TOL)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_the_c_path_over_a_half_precision_cache(kv_dtype: torch.dtype, threads: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--kv-cache-dtype: each layer's new K and V are rounded into the cache as the modules' store rounds them,
    and attention widens what it reads, so both paths agree over the same float16 or bfloat16 cache."""
    model = small_model(64, False, monkeypatch)
    assert model.decode_layers is not None
    ids, batch, cache = decode_step(model, [5, 64, 23], seed=11)
    cache = cache.to(kv_dtype)
    assert model.decode_layers.fits(model.embed_tokens(ids), batch.context_lens, cache)
    (got, got_cache), (want, want_cache) = both_paths(model, ids, batch, cache, threads)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert got_cache.dtype == kv_dtype
    torch.testing.assert_close(got_cache, want_cache, equal_nan=True)  # the dtype's own tolerance: one rounding


def test_steps_it_does_not_take_run_through_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt's chunk (more rows than sequences), more rows than the few-rows kernel takes, and a step with
    a per-layer KV hook (the prefill worker's) are the modules' work."""
    model = small_model(16, False, monkeypatch)
    fast = model.decode_layers
    assert fast is not None
    ids, batch, cache = decode_step(model, [9, 40], seed=0)
    assert fast.fits(model.embed_tokens(ids), batch.context_lens, cache)
    chunk = torch.zeros(3, model.cfg.hidden_size)
    assert not fast.fits(chunk, torch.tensor([12]), cache)
    assert not fast.fits(torch.zeros(5, model.cfg.hidden_size), torch.arange(5), cache)
    assert not fast.fits(model.embed_tokens(ids), batch.context_lens, cache.double())
    layers_seen: list[int] = []
    with torch.inference_mode():
        model(ids, batch, cache, on_layer_kv=lambda i, k, v: layers_seen.append(i))
    assert layers_seen == [0, 1]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("positions", POSITIONS, "position"),
    ("slot_mapping", BLOCKS * BLOCK_SIZE, "slot"),
    ("context_lens", 3 * BLOCK_SIZE + 1, "overruns its block table"),
    ("block_tables", BLOCKS, "block id"),
])  # fmt: skip
def test_bad_input_is_refused_and_nothing_written(field: str, value: int, message: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model(16, False, monkeypatch)
    ids, batch, cache = decode_step(model, [9, 17], seed=1)  # 3 blocks per sequence
    getattr(batch, field).view(-1)[-1] = value
    before = cache.clone()
    with torch.inference_mode(), pytest.raises(ValueError, match=message):
        model(ids, batch, cache)
    assert torch.equal(cache.nan_to_num(), before.nan_to_num())
