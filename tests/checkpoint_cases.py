"""The checkpoint matrix of issue 14: model directories as real checkpoints lay them out, for exactness tests.

Each case is a small random model (the `SMALL_MODEL` shape) of one family, with one RoPE variant, whose
config.json is written either

- ``"v5"``: by transformers 5's ``save_pretrained`` (RoPE settings nested in ``rope_parameters``), or
- ``"v4"``: in the layout hub checkpoints have (top-level ``rope_theta`` and ``rope_scaling``), as
  ``make_model`` writes it.

The cases together cover every family, layout, RoPE type (both layouts for each), theta 5e5 and 1e6, tied and
untied embeddings, MHA and GQA, and Qwen2's q/k/v bias. Scaled RoPE types use a small
``original_max_position_embeddings`` (64), so the longest prompt runs well past it.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORIGINAL_MAX_POSITIONS = 64
MAX_POSITIONS = 512  # = 8 x ORIGINAL_MAX_POSITIONS, the factor the llama3 and yarn cases use
PROMPT_LENGTHS = (5, 60, 300)
NUM_OUT = 16

_SMALL: dict[str, Any] = {  # tests/conftest.py's SMALL_MODEL, with a short context
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_POSITIONS,
}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS}
_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS}


@dataclass(frozen=True)
class CheckpointCase:
    family: str  # "llama", "mistral" or "qwen2" (q/k/v bias)
    layout: str  # "v5" or "v4", see the module docstring
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tied: bool
    mha: bool  # 4 KV heads for 4 query heads; GQA (2 KV heads) otherwise

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return str(scaling.get("rope_type", scaling.get("type", "default")))

    @property
    def overrides(self) -> dict[str, Any]:
        """`make_model` overrides of the case (the config it writes has the v4 layout)."""
        return {
            **_SMALL,
            "num_key_value_heads": 4 if self.mha else 2,
            "tie_word_embeddings": self.tied,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "qwen2": self.family == "qwen2",
            "mistral": self.family == "mistral",
        }


CHECKPOINT_CASES: dict[str, CheckpointCase] = {
    "llama-v5-theta500k": CheckpointCase("llama", "v5", 500000.0, None, tied=False, mha=False),
    "qwen2-v5-theta1m": CheckpointCase("qwen2", "v5", 1e6, None, tied=True, mha=False),
    "mistral-v5-linear": CheckpointCase("mistral", "v5", 1e6, {"rope_type": "linear", "factor": 4.0},
                                        tied=False, mha=True),
    "llama-v5-llama3": CheckpointCase("llama", "v5", 500000.0, _LLAMA3, tied=True, mha=False),
    "qwen2-v5-yarn": CheckpointCase("qwen2", "v5", 1e6, _YARN, tied=False, mha=False),
    "mistral-v5-yarn-mscale": CheckpointCase(
        "mistral", "v5", 10000.0,
        {**_YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 4.0, "beta_slow": 0.5, "truncate": False},
        tied=True, mha=False,
    ),
    "llama-v4-yarn": CheckpointCase("llama", "v4", 500000.0, {**_YARN, "factor": 4.0, "attention_factor": 1.3},
                                    tied=False, mha=True),
    "qwen2-v4-yarn": CheckpointCase("qwen2", "v4", 1e6, {"type": "yarn", "factor": 8.0,
                                                         "original_max_position_embeddings": 64},
                                    tied=True, mha=True),
    "qwen2-v4-theta1m": CheckpointCase("qwen2", "v4", 1e6, None, tied=False, mha=True),
    "llama-v4-linear": CheckpointCase("llama", "v4", 10000.0, {"type": "linear", "factor": 2.0}, tied=True,
                                      mha=False),
    "mistral-v4-llama3": CheckpointCase("mistral", "v4", 500000.0, _LLAMA3, tied=False, mha=False),
}


def write_case_model(name: str, make_test_model: Callable[..., Path], out_dir: Path) -> Path:
    """Writes case `name`'s model directory to `out_dir / name` (its basename is the case name) and returns it.

    `make_test_model` is the session fixture of tests/conftest.py; its cached directory is copied, never edited.
    """
    case = CHECKPOINT_CASES[name]
    target = out_dir / name
    shutil.copytree(make_test_model(**case.overrides), target)
    if case.layout == "v5":
        from transformers import AutoConfig

        AutoConfig.from_pretrained(target, local_files_only=True).save_pretrained(target)
    return target


def case_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts of PROMPT_LENGTHS tokens, ids below the special tokens of the tiny vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(7900) for _ in range(n)] for n in PROMPT_LENGTHS]
