"""The loader takes Llama-family directories and refuses anything else with a message naming what it supports."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace as dataclass_replace
from pathlib import Path

import pytest

from services.engine.errors import UnsupportedModel
from services.engine.model_config import load_model_config


@pytest.fixture
def model_copy(small_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(small_model, target)
    return target


def _edit_config(model: Path, **changes: object) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def _v5_rope(**rope_parameters: object) -> dict[str, object]:
    """Config changes that move RoPE into transformers 5's `rope_parameters` (the v4 keys set to null)."""
    return {"rope_theta": None, "rope_scaling": None, "rope_parameters": {"rope_theta": 10000.0, **rope_parameters}}


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
            "original_max_position_embeddings": 256}


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "'gpt2'"),
        ({"model_type": "falcon_mamba", "architectures": ["FalconMambaForCausalLM"]}, "'falcon_mamba'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "RoPE type 'dynamic'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "RoPE type 'dynamic'"),
        (_v5_rope(rope_type="dynamic", factor=2.0), "RoPE type 'dynamic'"),
        (_v5_rope(**LONGROPE), "RoPE type 'longrope'"),
        ({"rope_scaling": LONGROPE}, "RoPE type 'longrope'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
        (_v5_rope(rope_type="default", partial_rotary_factor=0.25), "partial_rotary_factor 0.25"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config .*'awq'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3.*low_freq_factor"),
    ],
    ids=["gpt2", "unknown-model-type", "gelu", "dynamic", "dynamic-legacy-key", "dynamic-v5", "longrope-v5",
         "longrope-v4", "partial-rotary", "partial-rotary-v5", "quantized", "llama-o-proj-bias", "llama3-incomplete"],
)
def test_unsupported_models_are_refused_by_name(model_copy: Path, changes: dict[str, object], named: str) -> None:
    _edit_config(model_copy, **changes)
    with pytest.raises(UnsupportedModel, match="supported: Llama-architecture") as refused:
        load_model_config(model_copy)
    assert re.search(named, str(refused.value)), str(refused.value)


def test_v4_and_v5_layouts_give_the_same_config(model_copy: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 8}
    _edit_config(model_copy, rope_theta=1e6, rope_scaling=yarn)
    v4 = load_model_config(model_copy)
    AutoConfig.from_pretrained(model_copy).save_pretrained(model_copy)
    assert "rope_parameters" in json.loads((model_copy / "config.json").read_text())
    assert load_model_config(model_copy) == v4
    assert v4.rope_theta == 1e6 and v4.rope_scaling == yarn


def test_yarn_without_a_factor_stretches_the_original_context_to_the_full_one(model_copy: Path) -> None:
    _edit_config(model_copy, max_position_embeddings=2048,
                 rope_scaling={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 512})
    assert load_model_config(model_copy).rope_scaling["factor"] == 4.0


def _write_generation_config(model: Path, **fields: object) -> None:
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [7, 9], **fields}))


def test_generation_defaults_are_the_sampling_keys_the_file_sets(model_copy: Path) -> None:
    assert load_model_config(model_copy).generation_defaults == {}  # make_model sets none
    _write_generation_config(model_copy, do_sample=True, temperature=0.6, top_p=0.9, top_k=20, min_p=None,
                             repetition_penalty=1.05, max_new_tokens=100, num_beams=1)
    config = load_model_config(model_copy)
    assert config.generation_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    assert isinstance(config.generation_defaults["top_k"], int)
    assert config.eos_token_ids[-2:] == (7, 9)


def test_generation_defaults_without_do_sample_keep_only_the_repetition_penalty(model_copy: Path) -> None:
    _write_generation_config(model_copy, do_sample=False, temperature=0.7, top_p=0.8, repetition_penalty=1.1)
    assert load_model_config(model_copy).generation_defaults == {"repetition_penalty": 1.1}
    _write_generation_config(model_copy, temperature=0.7, min_p=0.05)  # do_sample unset
    assert load_model_config(model_copy).generation_defaults == {"temperature": 0.7, "min_p": 0.05}


def test_a_non_numeric_generation_default_is_refused(model_copy: Path) -> None:
    _write_generation_config(model_copy, temperature="hot")
    with pytest.raises(UnsupportedModel, match="temperature must be a number"):
        load_model_config(model_copy)


def test_a_directory_without_weights_is_refused(model_copy: Path) -> None:
    for weights in model_copy.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UnsupportedModel, match="no \\*.safetensors"):
        load_model_config(model_copy)


def test_mistral_sliding_window_caps_the_context(model_copy: Path) -> None:
    _edit_config(model_copy, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=512,
                 max_position_embeddings=4096)
    config = load_model_config(model_copy)
    assert config.architecture == "MistralForCausalLM" and config.max_model_len == 512


def test_the_offline_api_and_grpc_take_the_generation_defaults_unless_told_not_to(model_copy: Path) -> None:
    from services.engine.llm import LLM
    from services.engine.sampling_params import SamplingParams
    from services.proto_gen import generation_pb2 as pb
    from services.router.convert import sampling_from_proto

    _write_generation_config(model_copy, do_sample=False, repetition_penalty=1.5)
    prompt = [(i * 13) % 900 + 20 for i in range(40)]
    penalised = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    auto = LLM(str(model_copy), num_blocks=64, max_model_len=256)
    assert auto.default_sampling_params.repetition_penalty == 1.5
    assert LLM(str(model_copy), num_blocks=64, max_model_len=256,
               generation_config="vllm").default_sampling_params == SamplingParams()
    with_defaults = auto.generate([prompt], dataclass_replace(auto.default_sampling_params, temperature=0,
                                                              max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert with_defaults[0].token_ids == auto.generate([prompt], penalised, use_tqdm=False)[0].token_ids
    assert with_defaults[0].token_ids != auto.generate([prompt], plain, use_tqdm=False)[0].token_ids
    # gRPC: an unset field takes the default, a set one wins, and no defaults means SamplingParams' own.
    defaults = load_model_config(model_copy).generation_defaults
    assert sampling_from_proto(pb.SamplingParams(), 16, defaults).repetition_penalty == 1.5
    assert sampling_from_proto(pb.SamplingParams(repetition_penalty=1.0), 16, defaults).repetition_penalty == 1.0
    assert sampling_from_proto(pb.SamplingParams(), 16, {}).repetition_penalty == 1.0
