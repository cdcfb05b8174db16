"""Frozen, validated configuration of the engine's parts.

Each field's default and help text are written here once; `pdserve serve`'s flags and `LLM`'s keyword options
are made from them (services/config_flags.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.config_flags import flag

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
GENERATION_CONFIGS = ("auto", "vllm")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int | None = field(
        default=None, metadata=flag("tokens per KV block, a power of two (default: 64 on CPU, 16 on CUDA)")
    )
    num_blocks: int | None = field(
        default=None, metadata=flag("KV blocks per worker (default: as many as the KV cache size holds)")
    )
    kv_cache_bytes: int = field(
        default=512 * 2**20, metadata=flag("KV cache per worker, MiB", name="--kv-cache-mb", unit=2**20)
    )
    enable_prefix_caching: bool = field(
        default=True, metadata=flag("reuse the KV of shared prompt prefixes", name="--no-prefix-caching")
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata=flag("what the KV cache stores (auto: the model's dtype); float16 or bfloat16 under float32 "
                      "weights halves the cache's bytes, and a decode's attention reads half as much (CPU only)",
                      choices=("auto", *DTYPES)),
    )

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in ("auto", *DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto, float32, bfloat16 or float16, got {self.kv_cache_dtype!r}")
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=128, metadata=flag("most requests in the running batch"))
    max_num_batched_tokens: int = field(default=2048, metadata=flag("token budget of one engine step"))
    enable_chunked_prefill: bool = field(
        default=True,
        metadata=flag("prefill long prompts in chunks that fit a step's token budget", name="--no-chunked-prefill"),
    )
    prefill_tokens_with_decodes: int = field(
        default=256,
        metadata=flag("most prompt tokens a step prefills while requests are decoding, so that a long prompt "
                      "arriving does not stall their tokens (chunked prefill; 0: the whole token budget)"),
    )

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.prefill_tokens_with_decodes < 0:
            raise ValueError(f"prefill_tokens_with_decodes must be >= 0, got {self.prefill_tokens_with_decodes}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = field(default="cpu", metadata=flag("where the model runs", choices=DEVICES))
    dtype: str | None = field(
        default=None, metadata=flag("weights and activations (default: float32 on CPU, bfloat16 on CUDA)",
                                    choices=DTYPES)
    )
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = field(
        default=None, metadata=flag("torch intra-op threads (default: torch's own)")
    )
    single_row_threads: int | None = field(
        default=None,
        metadata=flag("torch threads of a CPU step of one row, a decode at batch 1 (default: num_threads); the "
                      "server's decode workers take 1, as the router and Ray run on their cores"),
    )
    max_model_len: int | None = field(
        default=None, metadata=flag("context limit, tokens (default: the model's own context length)")
    )
    enforce_eager: bool = field(default=False, metadata=flag("no CUDA graphs for decode steps"))
    generation_config: str = field(
        default="auto",
        metadata=flag("auto: the model's generation_config.json gives the defaults for sampling fields a request "
                      "leaves out; vllm: it does not (pdserve's own defaults apply)", choices=GENERATION_CONFIGS),
    )

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.single_row_threads is not None and self.single_row_threads < 1:
            raise ValueError(f"single_row_threads must be positive, got {self.single_row_threads}")
        if self.generation_config not in GENERATION_CONFIGS:
            raise ValueError(f"generation_config must be 'auto' or 'vllm', got {self.generation_config!r}")
        if self.device == "cuda" and self.kv_cache_dtype_name != self.torch_dtype_name:
            raise ValueError(f"a KV cache of {self.kv_cache_dtype_name} under {self.torch_dtype_name} weights runs on "
                             "the CPU only: on CUDA the cache takes the model's dtype (--kv-cache-dtype auto)")

    @property
    def torch_dtype_name(self) -> str:
        return self.dtype or ("float32" if self.device == "cpu" else "bfloat16")

    @property
    def kv_cache_dtype_name(self) -> str:
        kv = self.cache.kv_cache_dtype
        return self.torch_dtype_name if kv == "auto" else kv

    @property
    def block_size(self) -> int:
        """Tokens per KV block. On CPU a decode's attention reads its blocks in place, and a 16-token block of
        the tiny preset is 16 KiB of K (and as much of V) at a random place: one core streams such blocks at
        about 12 GB/s against 20-30 GB/s for 64 KiB ones (services/bench/README.md, "KV block size on CPU")."""
        return self.cache.block_size or (64 if self.device == "cpu" else 16)
