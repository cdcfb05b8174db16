"""Flags and keyword options made from the config dataclasses: `pdserve serve`'s flags, `LLM(**options)`."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services import serve
from services.config_flags import ConfigFlags, flag, from_options
from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.router.config import RouterConfig
from services.transfer.config import TransferConfig

GROUPS: list[ConfigFlags[Any]] = [
    serve.ENGINE_FLAGS, serve.CACHE_FLAGS, serve.SCHEDULER_FLAGS, serve.ROUTER_FLAGS, serve.TRANSFER_FLAGS
]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def _help() -> str:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.format_help()


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.cls.__name__)
def test_every_flag_has_its_fields_default_and_help(group: ConfigFlags[Any]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(group.cls)}
    assert group.flags, group.cls
    assert group.values(_parse()) == {f.field_name: defaults[f.field_name] for f in group.flags}
    text = " ".join(_help().split())
    for f in group.flags:
        assert f.spec.help and f.option in text, f
        assert " ".join(f.spec.help.split()) in text, f


def test_serve_flags_cover_every_field_but_those_serve_sets_itself() -> None:
    flagged = {(g.cls.__name__, f.field_name) for g in GROUPS for f in g.flags}
    everything = {(g.cls.__name__, f.name) for g in GROUPS for f in dataclasses.fields(g.cls)}
    assert everything - flagged == {
        ("EngineConfig", "model"), ("EngineConfig", "device"), ("EngineConfig", "cache"),  # own flags / nested
        ("EngineConfig", "scheduler"), ("EngineConfig", "num_threads"),  # set per worker by the pools
        ("EngineConfig", "single_row_threads"),
        ("CacheConfig", "enable_prefix_caching"), ("RouterConfig", "max_request_bytes"),
        ("TransferConfig", "port"), ("TransferConfig", "ucx_tls"),
    }


def test_the_flag_names_and_defaults_serve_has_always_had() -> None:
    a = _parse()
    assert (a.kv_cache_mb, a.block_size, a.num_blocks, a.no_chunked_prefill) == (512, None, None, False)
    assert EngineConfig(model="m").block_size == 64  # a block of its own per decode read on CPU
    assert EngineConfig(model="m", device="cuda").block_size == 16
    assert EngineConfig(model="m", cache=CacheConfig(block_size=32)).block_size == 32
    assert (a.max_num_seqs, a.max_num_batched_tokens, a.max_model_len, a.dtype) == (128, 2048, None, None)
    assert (a.mode, a.prefill_policy, a.decode_policy, a.local_prefill_threshold) == (
        "disagg", "prefix_affinity", "least_loaded", 32)
    assert (a.lease_s, a.default_max_tokens, a.slo_ttft_ms, a.slo_tpot_ms) == (30.0, 16, None, None)
    assert (a.transfer_timeout_s, a.transfer_failure_policy, a.transfer_staging_mib, a.transfer_spin_us) == (
        30.0, "recompute", 256, 200)
    assert (a.generation_config, a.enforce_eager, a.device, a.model) == ("auto", False, None, None)
    with pytest.raises(SystemExit):
        _parse("--transfer-failure-policy", "retry")


def test_the_kv_cache_dtype_flag() -> None:
    a = _parse("--model", "m", "--kv-cache-dtype", "float16")
    engine = serve.engine_config(a, "cpu")
    assert engine.cache.kv_cache_dtype == "float16" and engine.kv_cache_dtype_name == "float16"
    assert EngineConfig(model="m").kv_cache_dtype_name == "float32"  # auto: the model's dtype
    assert EngineConfig(model="m", device="cuda").kv_cache_dtype_name == "bfloat16"
    with pytest.raises(SystemExit, match="--kv-cache-dtype auto"):  # the Triton kernels take one dtype
        serve.engine_config(a, "cuda")
    with pytest.raises(SystemExit):
        _parse("--kv-cache-dtype", "int8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        CacheConfig(kv_cache_dtype="fp8")


def test_a_bad_engine_flag_exits_with_its_reason() -> None:
    with pytest.raises(SystemExit, match="pdserve serve: error: block_size must be a power of two, got 3"):
        serve.engine_config(_parse("--model", "m", "--block-size", "3"), "cpu")


def test_defaults_build_the_default_configs() -> None:
    a = _parse("--model", "m")
    assert serve.engine_config(a, "cpu") == EngineConfig(model="m")
    assert serve.router_config(a) == RouterConfig()
    assert serve.transfer_config(a) == TransferConfig()


@pytest.mark.parametrize(
    ("argv", "engine", "router", "transfer"),
    [
        (
            ["--kv-cache-mb", "64", "--block-size", "32", "--no-chunked-prefill", "--max-model-len", "256"],
            EngineConfig(model="m", max_model_len=256, cache=CacheConfig(block_size=32, kv_cache_bytes=64 * 2**20),
                         scheduler=SchedulerConfig(enable_chunked_prefill=False)),
            RouterConfig(),
            TransferConfig(),
        ),
        (
            ["--num-blocks", "100", "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--dtype", "bfloat16",
             "--enforce-eager", "--generation-config", "vllm"],
            EngineConfig(model="m", dtype="bfloat16", enforce_eager=True, generation_config="vllm",
                         cache=CacheConfig(num_blocks=100), scheduler=SchedulerConfig(8, 512)),
            RouterConfig(),
            TransferConfig(),
        ),
        (
            ["--mode", "colocated", "--lease-s", "2.5", "--local-prefill-threshold", "0", "--default-max-tokens", "4",
             "--slo-ttft-ms", "500", "--slo-tpot-ms", "50", "--prefill-policy", "round_robin", "--decode-policy",
             "round_robin", "--transfer-failure-policy", "fail", "--transfer-timeout-s", "5",
             "--transfer-staging-mib", "0", "--transfer-spin-us", "0", "--host", "0.0.0.0"],
            EngineConfig(model="m"),
            RouterConfig(mode="colocated", lease_s=2.5, local_prefill_threshold=0, default_max_tokens=4,
                         slo_ttft_ms=500.0, slo_tpot_ms=50.0, prefill_policy="round_robin",
                         decode_policy="round_robin"),
            TransferConfig(failure_policy="fail", timeout_s=5.0, staging_mib=0, spin_us=0),
        ),
    ],
)
def test_serve_flags_build_the_configs(argv: list[str], engine: EngineConfig, router: RouterConfig,
                                       transfer: TransferConfig) -> None:
    a = _parse("--model", "m", *argv)
    assert serve.engine_config(a, "cpu") == engine
    assert serve.router_config(a) == router
    assert serve.transfer_config(a) == transfer


def test_the_kv_address_is_the_workers_own_unless_advertised() -> None:
    """Decode workers advertise their node's address (host ""), never the router's --host."""
    assert serve.transfer_config(_parse("--host", "10.1.2.3")).host == ""
    assert serve.transfer_config(_parse("--advertise-host", "10.9.8.7")).host == "10.9.8.7"


def test_options_reach_the_nested_configs_and_unknown_ones_are_refused() -> None:
    config = from_options(EngineConfig, "LLM", {"num_blocks": 64, "max_num_seqs": 4, "dtype": "float32"}, model="m")
    assert config == EngineConfig(model="m", dtype="float32", cache=CacheConfig(num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_seqs=4))
    for bad in ("kv_cache_mb", "cache", "model", "max_num_seq"):
        with pytest.raises(TypeError, match=f"LLM\\(\\) got an unexpected keyword argument '{bad}'"):
            from_options(EngineConfig, "LLM", {bad: 1}, model="m")


def test_llm_rejects_an_unknown_option_and_a_bad_value_before_loading(tmp_path: Path) -> None:
    from services.engine.llm import LLM

    with pytest.raises(TypeError, match="unexpected keyword argument 'kv_cache_gib'"):
        LLM(str(tmp_path), kv_cache_gib=1)
    with pytest.raises(ValueError, match="generation_config"):
        LLM(str(tmp_path), generation_config="hf")


def test_a_field_without_flag_metadata_or_default_must_be_excluded() -> None:
    @dataclass(frozen=True)
    class Config:
        name: str
        size: int = field(default=3 * 2**20, metadata=flag("size, MiB", name="--size-mib", unit=2**20))
        quiet: bool = field(default=True, metadata=flag("talk", name="--no-talk"))
        plain: int = 1

    with pytest.raises(TypeError, match="Config.name has no flag"):
        ConfigFlags(Config, exclude=("plain",))
    with pytest.raises(TypeError, match="Config.plain has no flag"):
        ConfigFlags(Config, exclude=("name",))
    with pytest.raises(ValueError, match="no field"):
        ConfigFlags(Config, exclude=("name", "plain", "nothing"))
    flags = ConfigFlags(Config, exclude=("name", "plain"))
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    assert flags.build(parser.parse_args([]), name="x") == Config("x")
    assert flags.build(parser.parse_args(["--size-mib", "5", "--no-talk"]), name="x") == Config("x", 5 * 2**20, False)
