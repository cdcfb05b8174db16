"""`pdserve bench step`: the engine's decode step at fixed batch sizes, against its roofline.

For each batch size B, B requests of `--context` random prompt tokens are prefilled, then `--rounds` rounds of
`--steps` pure-decode engine steps are timed (each step: schedule, the runner's inputs, the forward pass over
the paged KV cache, sampling, update). With `--compare-reference` every round times the torch reference
attention (the gathering one, kernels/attention.paged_attention_ref) right after the in-place CPU kernel, on
the same requests, so the two are compared under the same load. Both wall time and process CPU time are
reported: on a shared host the CPU time moves less with the load.

    roofline = max(memory, compute)
    memory   = (weight bytes + KV bytes of every context) / read bandwidth (the best of 30 sums of 256 MiB)
    compute  = the step's FLOPs (2 per weight per row, 4 per head dimension per context token for attention)
               / the best rate of the engine's own product on 512 rows (a 2048 x 2048 projection)

both measured with the benchmark's torch threads. A decode step only reads its weights and KV, so the memory
ceiling is the rate at which the cores can read; earlier stops divided by the bandwidth of a 256 MiB copy (read
+ write bytes over the time), which this host sustains only with a write stream beside the read. That ratio is
still printed ("copy roofline") so that figures compare across stops.

Then, with the B decodes still running, a `--prompt-len` prompt arrives: every step that carries one of its
chunks is timed, which is what the scheduler's token budget (`--max-num-batched-tokens`) costs the decodes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.bench.offline import (
    ENGINE_FLAGS,
    SCHEDULER_FLAGS,
    best_seconds,
    decode_weight_bytes,
    memory_bandwidth,
    read_bandwidth,
)
from services.config_flags import ConfigFlags
from services.engine.config import CacheConfig

# --block-size and --kv-cache-dtype, as the engine defines them; the cache's size is --kv-cache-gib.
CACHE_FLAGS = ConfigFlags(CacheConfig, exclude=("num_blocks", "kv_cache_bytes", "enable_prefix_caching"))

if TYPE_CHECKING:
    from services.engine.engine import LLMEngine


@dataclass
class Timings:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def line(self, roofline_s: float, copy_roofline_s: float) -> str:
        wall, cpu = statistics.median(self.wall_s), statistics.median(self.cpu_s)
        return (f"median {wall * 1e3:7.2f} ms (min {min(self.wall_s) * 1e3:6.2f}, CPU {cpu * 1e3:6.2f}) "
                f"= {wall / roofline_s:4.1f}x roofline (min {min(self.wall_s) / roofline_s:4.1f}x; "
                f"{wall / copy_roofline_s:4.1f}x copy roofline)")


@dataclass
class Ceilings:
    """What the host can do at the benchmark's thread count: read bytes/s, copy bytes/s, product FLOP/s."""

    read: float
    copy: float
    flops: float

    @classmethod
    def measure(cls, device: str) -> Ceilings:
        return cls(read=max(read_bandwidth(repeats=10) for _ in range(3)),  # the least disturbed of 30
                   copy=max(memory_bandwidth(device, repeats=10) for _ in range(3)), flops=product_flops())


def product_flops(rows: int = 512, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the engine's CPU product (kernels/cpu_linear.py) at `rows` rows of a size x size projection."""
    import torch

    from kernels.cpu_linear import PackedLinear, can_pack

    linear = torch.nn.Linear(size, size, bias=False)
    product = PackedLinear(linear) if can_pack(linear) else linear
    x = torch.randn(rows, size)
    with torch.inference_mode():
        return 2 * rows * size * size / best_seconds(lambda: product(x), repeats)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens of each decoding request")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=1000,
                        help="a prompt of this many tokens arrives after the decode rounds (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--compare-reference", action="store_true",
                        help="also time the torch reference attention (gathers K/V) in every round")
    parser.add_argument("--seed", type=int, default=0)
    ENGINE_FLAGS.add_to(parser)
    CACHE_FLAGS.add_to(parser)
    SCHEDULER_FLAGS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    """Body of `pdserve bench step`: the report on stdout; 2 with a message for bad flags."""
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        if min(sizes) < 1 or args.context < 1 or args.steps < 1 or args.rounds < 1 or args.prompt_len < 0:
            raise ValueError("batch sizes, --context, --steps and --rounds must be positive")
        engine = _engine(args)
    except (OSError, ValueError) as e:
        print(f"pdserve bench step: error: {e}", file=sys.stderr)
        return 2
    import torch

    ceilings = Ceilings.measure(args.device)
    weights = decode_weight_bytes(engine.runner.model, engine.model_config.tie_word_embeddings)
    print(f"pdserve bench step: {args.model}, {engine.config.torch_dtype_name} on {args.device}, torch threads "
          f"{torch.get_num_threads()}; weights {weights / 2**20:.1f} MiB, KV {_kv_token_bytes(engine) / 2**10:.0f} "
          f"KiB per token; read bandwidth {ceilings.read / 1e9:.1f} GB/s, copy bandwidth {ceilings.copy / 1e9:.1f} "
          f"GB/s (read + write), products {ceilings.flops / 1e9:.0f} GFLOP/s", flush=True)
    rng = random.Random(args.seed)
    for batch in sizes:
        for line in _batch_lines(engine, args, batch, rng, weights, ceilings):
            print(line, flush=True)
    return 0


def _engine(args: argparse.Namespace) -> LLMEngine:
    import torch

    from services.engine.config import EngineConfig, SchedulerConfig
    from services.engine.engine import LLMEngine
    from services.modelgen.default_model import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = resolve_model(args.model)
    cache = CACHE_FLAGS.build(args, kv_cache_bytes=int(args.kv_cache_gib * 2**30))
    scheduler = SchedulerConfig(**SCHEDULER_FLAGS.values(args))
    return LLMEngine(EngineConfig(model=args.model, cache=cache, scheduler=scheduler, **ENGINE_FLAGS.values(args)))


def _kv_token_bytes(engine: LLMEngine) -> int:
    cache = engine.runner.kv_cache  # [layers, 2, blocks, block_size, Hk, D]
    return cache[:, :, 0, 0].numel() * cache.element_size()


def _batch_lines(engine: LLMEngine, args: argparse.Namespace, batch: int, rng: random.Random, weights: int,
                 ceilings: Ceilings) -> list[str]:
    """Prefills `batch` requests, times the decode rounds, then a long prompt's chunks; aborts them all."""
    import kernels.cpu_attention as cpu_attention
    from services.engine.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    total = args.rounds * (args.steps + 2) * (2 if args.compare_reference else 1) + 64
    params = SamplingParams(temperature=0, max_tokens=total, ignore_eos=True)
    ids = [f"step-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(vocab // 2) for _ in range(args.context)], params)
    while engine.scheduler.waiting or any(not r.output_token_ids for r in engine.scheduler.running):
        engine.step()
    variants = {"in place": True, "reference": False} if args.compare_reference else {"in place": True}
    timings = {name: Timings() for name in variants}
    contexts: list[int] = []
    try:
        for _ in range(args.rounds):
            for name, native in variants.items():
                cpu_attention.use_native = native
                engine.step()
                engine.step()
                contexts.append(sum(r.num_tokens for r in engine.scheduler.running))
                time_steps(engine, args.steps, timings[name])
    finally:
        cpu_attention.use_native = True
    context = statistics.mean(contexts)
    kv_bytes = context * _kv_token_bytes(engine)
    mc = engine.model_config
    weight_count = weights / next(engine.runner.model.parameters()).element_size()
    flops = 2 * batch * weight_count + 4 * mc.num_layers * mc.num_heads * mc.head_dim * context
    memory_s, compute_s = (weights + kv_bytes) / ceilings.read, flops / ceilings.flops
    roofline_s, copy_roofline_s = max(memory_s, compute_s), (weights + kv_bytes) / ceilings.copy
    lines = [f"batch {batch}: mean context {context / batch:.0f} tokens, KV {kv_bytes / 2**20:.1f} MiB and "
             f"{flops / 1e9:.2f} GFLOP per step; roofline {roofline_s * 1e3:.2f} ms (memory {memory_s * 1e3:.2f}, "
             f"compute {compute_s * 1e3:.2f}; copy roofline {copy_roofline_s * 1e3:.2f}); {args.rounds} x "
             f"{args.steps} steps"]
    lines += [f"  {name:9s} {t.line(roofline_s, copy_roofline_s)}" for name, t in timings.items()]
    if args.prompt_len:
        lines.append(_chunk_line(engine, args.prompt_len, vocab, rng))
    engine.abort(ids)
    engine.step()
    return lines


def time_steps(engine: LLMEngine, steps: int, into: Timings) -> None:
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        engine.step()
        into.wall_s.append(time.perf_counter() - wall)
        into.cpu_s.append(time.process_time() - cpu)


def _chunk_line(engine: LLMEngine, prompt_len: int, vocab: int, rng: random.Random) -> str:
    """The steps that carry chunks of a new `prompt_len`-token prompt beside the running decodes."""
    from services.engine.sampling_params import SamplingParams

    engine.add_request("step-prompt", [rng.randrange(vocab // 2) for _ in range(prompt_len)],
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    times: list[float] = []
    while "step-prompt" in engine.scheduler.requests:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    budget = engine.config.scheduler.max_num_batched_tokens
    return (f"  a {prompt_len}-token prompt arriving (token budget {budget} per step): {len(times)} step(s) of "
            f"{', '.join(f'{t * 1e3:.0f}' for t in times)} ms with the decodes")
