"""`pdserve make-model`: generated directories load in transformers, are deterministic, and decode cleanly."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from services.modelgen.build import make_model
from services.modelgen.cli import add_arguments, run
from services.modelgen.default_model import default_model_dir, resolve_model
from services.modelgen.preset import LLAMA3_ROPE_SCALING, PRESETS
from services.modelgen.tokenizer import BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, write_tokenizer_files
from services.modelgen.weights import num_parameters

SMALL: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "qwen2": {"qwen2": True},
    "mistral": {"mistral": True},
    "sharded": {"shard_size_bytes": 1_000_000},
    "llama3-rope": {
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": 1024},
    },
    "bf16": {"dtype": "bfloat16"},
}
TEXTS = [
    "The harbor at dawn was quiet.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "def f(x: int) -> int:\n    return x ** 2  # squares\n",
    "Ünïcödé, 日本語のテキスト, emoji 🚀🌊 and math ∑ ≤ ∞.",
    "numbers 1234567890 and 3.14159, dates 2024-06-11",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny preset plus each small variant, built once for this module."""
    root = tmp_path_factory.mktemp("make-model")
    built = {"tiny": make_model(root / "tiny", "tiny", 0)}
    for name, overrides in VARIANTS.items():
        built[name] = make_model(root / name, "tiny", 0, **{**SMALL, **overrides})
    return built


@contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Collects warnings that transformers logs or raises inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        # ResourceWarnings come from garbage collection of other tests' objects, not from loading.
        messages.extend(str(w.message) for w in caught if not issubclass(w.category, ResourceWarning))
    finally:
        logger.removeHandler(handler)


def load(model_dir: Path) -> tuple[transformers.PreTrainedModel, Any]:
    with transformers_warnings() as messages:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    assert messages == [], messages
    return model.eval(), tokenizer


def test_tiny_preset_loads_in_transformers(models: dict[str, Path]) -> None:
    model, tokenizer = load(models["tiny"])
    config = json.loads((models["tiny"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (4, 512, 8)
    assert (config["num_key_value_heads"], config["head_dim"], config["max_position_embeddings"]) == (4, 64, 2048)
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is False
    assert 18e6 < model.num_parameters() < 24e6
    assert model.num_parameters() == num_parameters(PRESETS["tiny"])
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert (models["tiny"] / "model.safetensors").is_file()


def test_vocab_sizes_and_special_ids_agree(models: dict[str, Path]) -> None:
    model, tokenizer = load(models["tiny"])
    config = json.loads((models["tiny"] / "config.json").read_text())
    generation = json.loads((models["tiny"] / "generation_config.json").read_text())
    assert len(tokenizer) == config["vocab_size"] == 8192
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 8192
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.bos_token_id == config["bos_token_id"]
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == config["eos_token_id"]
    assert generation["eos_token_id"] == [config["eos_token_id"], tokenizer.convert_tokens_to_ids(EOT_TOKEN)]
    # Llama 3 layout: the BPE fills the first vocab-256 ids, the special block the last 256.
    assert config["bos_token_id"] == 8192 - 256
    assert tokenizer.convert_ids_to_tokens(8191) == "<|reserved_special_token_250|>"


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_and_adds_bos_only(models: dict[str, Path], text: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["tiny"])
    plain = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(plain) == text
    with_specials = tokenizer(text).input_ids
    assert with_specials == [tokenizer.bos_token_id, *plain]
    raw = Tokenizer.from_file(str(models["tiny"] / "tokenizer.json"))
    assert raw.encode(text).ids == with_specials
    assert raw.decode(with_specials, skip_special_tokens=True) == text


def test_tokenizer_learned_real_merges(models: dict[str, Path]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["tiny"])
    text = "The river crossed the valley beneath the mountain."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) <= 12, ids  # common words are single tokens, not bytes
    assert all(i < 8192 - 256 for i in ids)


def test_chat_template_renders_llama3_headers(models: dict[str, Path]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["tiny"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "  Hi there! "}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without_prompt.endswith("Hi there!<|eot_id|>")
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.convert_tokens_to_ids(EOT_TOKEN)) == 2
    config = json.loads((models["tiny"] / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 2048


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_load_in_transformers(models: dict[str, Path], variant: str) -> None:
    model, tokenizer = load(models[variant])
    config = json.loads((models[variant] / "config.json").read_text())
    expected_arch = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(variant, "LlamaForCausalLM")
    assert config["architectures"] == [expected_arch] and type(model).__name__ == expected_arch
    assert len(tokenizer) == config["vocab_size"]
    ids = torch.tensor([tokenizer("A short prompt about the sea.").input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config["vocab_size"]) and torch.isfinite(logits).all()


def test_variant_specifics(models: dict[str, Path]) -> None:
    mha, _ = load(models["mha"])
    assert mha.config.num_key_value_heads == mha.config.num_attention_heads == 4
    tied, _ = load(models["tied"])
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    with safe_open(str(models["tied"] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    qwen, _ = load(models["qwen2"])
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = getattr(qwen.model.layers[1].self_attn, proj).bias
        assert bias is not None and bias.abs().min() > 0 and bias.std() > 0.05
    rope, _ = load(models["llama3-rope"])
    assert rope.config.rope_parameters["rope_type"] == "llama3"
    assert rope.config.rope_parameters["rope_theta"] == 500000.0
    bf16, _ = load(models["bf16"])
    assert bf16.dtype == torch.bfloat16


def test_sharded_model_has_index_and_same_weights(models: dict[str, Path]) -> None:
    index = json.loads((models["sharded"] / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (models["sharded"] / "model.safetensors").exists()
    for shard in shards:  # a shard stays under the limit unless it holds one tensor that is larger by itself
        names = [n for n, s in index["weight_map"].items() if s == shard]
        assert len(names) == 1 or (models["sharded"] / shard).stat().st_size < 1_000_000 + 4096, (shard, names)
    total = 0
    with safe_open(str(models["gqa"] / "model.safetensors"), "pt") as whole:
        assert set(index["weight_map"]) == set(whole.keys())
        for name, shard in index["weight_map"].items():
            with safe_open(str(models["sharded"] / shard), "pt") as part:
                tensor = part.get_tensor(name)
            assert torch.equal(tensor, whole.get_tensor(name)), name
            total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def test_same_seed_gives_identical_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    again = make_model(tmp_path / "again", "tiny", 0, **SMALL)
    assert _files(again) == _files(models["gqa"])


@pytest.mark.parametrize("qwen2", [False, True])
def test_tokenizer_training_is_deterministic_across_processes(tmp_path: Path, qwen2: bool) -> None:
    """The in-process cache would hide nondeterminism: train again in a fresh interpreter and compare bytes."""
    code = (
        "import sys, pathlib; from services.modelgen.tokenizer import write_tokenizer_files; "
        f"write_tokenizer_files(pathlib.Path(sys.argv[1]), 8192, 2048, {qwen2})"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    here = tmp_path / "here"
    here.mkdir()
    write_tokenizer_files(here, 8192, 2048, qwen2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (here / name).read_bytes(), name


def test_different_seed_changes_weights_only(models: dict[str, Path], tmp_path: Path) -> None:
    other = _files(make_model(tmp_path / "seed1", "tiny", 1, **SMALL))
    base = _files(models["gqa"])
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"] and other["config.json"] == base["config.json"]


def test_greedy_decoding_is_well_conditioned(models: dict[str, Path]) -> None:
    """Greedy parity tests need clear argmax winners and no immediate collapse into one repeated token."""
    model, tokenizer = load(models["tiny"])
    for prompt in ["The harbor at dawn was quiet.", "def moving_average(values):"]:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        new = out.sequences[0, ids.shape[1] :].tolist()
        gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
        assert len(new) == 20 and min(gaps) > 1e-3, gaps
        assert len(set(new)) >= 10, new
        assert all(t < tokenizer.bos_token_id for t in new), new  # specials are damped in the output layer


def test_unknown_preset_and_bad_overrides_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny.*small.*llama3-8b"):
        make_model(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="num_layers"):
        make_model(tmp_path / "x", "tiny", num_layers=2)
    with pytest.raises(ValueError, match="not divisible"):
        make_model(tmp_path / "x", "tiny", hidden_size=100)
    with pytest.raises(ValueError, match="dtype"):
        make_model(tmp_path / "x", "tiny", dtype="float16")
    with pytest.raises(ValueError, match="seed"):
        make_model(tmp_path / "x", "tiny", -1)
    with pytest.raises(ValueError, match="at most one"):
        make_model(tmp_path / "x", "tiny", qwen2=True, mistral=True)
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        make_model(tmp_path, "tiny", 0, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_arguments_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--preset", "tiny", "--seed", "3"])
    assert (args.out, args.preset, args.seed) == (tmp_path, "tiny", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--preset", "huge"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "tiny"])
    (tmp_path / "occupied").write_text("")
    assert run(args) == 2
    assert "not an empty directory" in capsys.readouterr().err
    out = tmp_path / "cli-model"
    assert run(parser.parse_args(["--out", str(out)])) == 0
    assert "tiny" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_default_model_dir_survives_a_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_HOME", str(tmp_path))
    stale = tmp_path / "models" / "tiny-seed0"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # an interrupted or outdated copy must be replaced
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(default_model_dir())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [stale, stale]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-seed0"]  # no temp leftovers
    mtime = (stale / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == stale and (stale / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((stale / "config.json").read_text())["hidden_size"] == 512
    assert resolve_model(None) == str(stale) and resolve_model("some/model") == "some/model"
