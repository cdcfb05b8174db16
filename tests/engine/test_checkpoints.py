"""Real checkpoint layouts give exactly transformers' answers (issue 14).

Every case of tests/checkpoint_cases.py (family x config layout x RoPE variant x tied/untied x MHA/GQA) runs
greedy in float32 through the offline `LLM` and through transformers 5, and the tokens must be equal. The
rotary tables are also compared with transformers' own rotary embedding, bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.bench.offline import hf_generate, load_transformers
from services.engine.llm import LLM
from services.engine.model_config import load_model_config
from services.engine.sampling_params import SamplingParams
from tests.checkpoint_cases import CHECKPOINT_CASES, NUM_OUT, ORIGINAL_MAX_POSITIONS, case_prompts, write_case_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True)


@pytest.fixture(scope="module")
def case_model(make_test_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = write_case_model(name, make_test_model, root)
        return made[name]

    return get


def test_the_cases_cover_every_value_of_every_axis() -> None:
    cases = CHECKPOINT_CASES.values()
    assert {c.family for c in cases} == {"llama", "mistral", "qwen2"}
    assert {c.tied for c in cases} == {c.mha for c in cases} == {True, False}
    assert {500000.0, 1e6} <= {c.rope_theta for c in cases if c.rope_type == "default"}
    for layout in ("v4", "v5"):
        assert {c.rope_type for c in cases if c.layout == layout} == {"default", "linear", "llama3", "yarn"}


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_config_layout_is_what_the_case_says(case_model: Callable[[str], Path], name: str) -> None:
    case = CHECKPOINT_CASES[name]
    config = json.loads((case_model(name) / "config.json").read_text())
    if case.layout == "v5":
        assert "rope_theta" not in config and "rope_scaling" not in config
        assert config["rope_parameters"]["rope_theta"] == case.rope_theta
        assert config["rope_parameters"]["rope_type"] == case.rope_type
    else:
        assert "rope_parameters" not in config and config["rope_theta"] == case.rope_theta
    loaded = load_model_config(case_model(name))
    assert loaded.rope_theta == case.rope_theta
    assert loaded.rope_scaling["rope_type"] == case.rope_type
    assert loaded.attention_bias == (case.family == "qwen2")
    assert loaded.tie_word_embeddings == case.tied


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_rotary_table_equals_transformers_bit_for_bit(case_model: Callable[[str], Path], name: str) -> None:
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from kernels.rotary import build_cos_sin_cache

    model = case_model(name)
    cfg = load_model_config(model)
    ours = build_cos_sin_cache(cfg.head_dim, cfg.max_model_len, cfg.rope_theta, cfg.rope_scaling, torch.float32)
    rotary_class = {"llama": LlamaRotaryEmbedding, "mistral": MistralRotaryEmbedding, "qwen2": Qwen2RotaryEmbedding}
    rotary = rotary_class[CHECKPOINT_CASES[name].family](AutoConfig.from_pretrained(model, local_files_only=True))
    positions = torch.arange(cfg.max_model_len)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cfg.head_dim // 2
    assert torch.equal(ours[:, :half], cos[0, :, :half]) and torch.equal(ours[:, half:], sin[0, :, :half])


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_greedy_tokens_equal_transformers(case_model: Callable[[str], Path], name: str) -> None:
    model = case_model(name)
    prompts = case_prompts()
    assert max(map(len, prompts)) > ORIGINAL_MAX_POSITIONS
    expected = hf_generate(load_transformers(str(model), "cpu", torch.float32), prompts, NUM_OUT)
    results = LLM(str(model), num_blocks=64).generate(prompts, GREEDY, use_tqdm=False)
    for prompt, result, want in zip(prompts, results, expected, strict=True):
        assert result.error is None
        assert result.token_ids == want, f"{len(prompt)}-token prompt differs"


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": None},
        {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128, "beta_slow": 2.0},
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "mscale": 1.0},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "beta_fast": 64.0,
         "beta_slow": 45.0},  # low == high == 0: an empty ramp
        {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 100},
        {"rope_type": "linear", "factor": 0.5},
    ],
    ids=["yarn-truncate-null", "yarn-no-factor", "yarn-mscale-only", "yarn-empty-ramp", "llama3", "linear"],
)
def test_rotary_table_of_more_rope_variants_equals_transformers(tmp_path: Path,
                                                                rope_parameters: dict[str, object]) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from kernels.rotary import build_cos_sin_cache

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512,
                         rope_parameters={"rope_theta": 20000.0, **rope_parameters}, architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()  # the config is all this test reads
    cfg = load_model_config(tmp_path)
    ours = build_cos_sin_cache(cfg.head_dim, cfg.max_model_len, cfg.rope_theta, cfg.rope_scaling, torch.float32)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(cfg.max_model_len)[None])
    assert torch.equal(ours, torch.cat([cos[0, :, :32], sin[0, :, :32]], dim=-1))
