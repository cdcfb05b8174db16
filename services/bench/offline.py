"""`pdserve bench offline`: pdserve's offline engine against transformers `generate` on the same work.

Both run the same random prompts (token ids) with per-request output lengths, greedy, ignoring EOS,
on the same device in the same dtype (float32 on CPU, bfloat16 on CUDA by default). transformers
batches statically and each batch runs to its longest output; only the requested tokens are counted.
It is timed twice: as one batched `generate` over all the prompts, and in smaller batches of requests
sorted by output length, which wastes far fewer steps (the stronger baseline). Also prints
the decode roofline of the device (weight bytes read per decode step over measured memory bandwidth:
DRAM on CPU, HBM on CUDA) beside measured pure-decode step times.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.bench.datasets import LengthRange, TokenSpace
from services.config_flags import ConfigFlags
from services.engine.config import EngineConfig, SchedulerConfig

if TYPE_CHECKING:
    import torch

    from services.engine.llm import LLM

# pdserve's engine options (defaults and help on the config fields); the KV cache size is --kv-cache-gib.
ENGINE_FLAGS = ConfigFlags(EngineConfig, exclude=("model", "cache", "scheduler", "num_threads", "single_row_threads",
                                                  "max_model_len", "generation_config"))
SCHEDULER_FLAGS = ConfigFlags(SchedulerConfig, exclude=("enable_chunked_prefill",))


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class RunResult:
    seconds: float
    tokens: list[list[int]]

    def tokens_per_s(self, workload: Workload) -> float:
        return workload.num_output_tokens / self.seconds


@dataclass
class StepLog:
    """Wall time of every engine step that was pure decode, by batch size."""

    decode_s: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))

    def attach(self, llm: LLM) -> None:
        """Times llm.engine.step and remembers what each step scheduled (instrumentation only)."""
        engine = llm.engine
        schedule, step = engine.scheduler.schedule, engine.step
        last: list[Any] = [None]

        def scheduled() -> Any:
            last[0] = schedule()
            return last[0]

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            outputs = step(*args, **kwargs)
            elapsed = time.perf_counter() - start
            sched = last[0].scheduled if last[0] is not None else []
            if sched and all(len(s.token_ids) == 1 for s in sched):
                self.decode_s[len(sched)].append(elapsed)
            return outputs

        engine.scheduler.schedule = scheduled  # type: ignore[method-assign]
        engine.step = timed_step  # type: ignore[method-assign]


def make_workload(num_prompts: int, input_len: LengthRange, output_len: LengthRange, space: TokenSpace,
                  seed: int) -> Workload:
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(num_prompts):
        prompts.append(list(space.sample(rng, input_len.sample(rng))))
        outs.append(output_len.sample(rng))
    return Workload(prompts, outs)


def run_pdserve(llm: LLM, workload: Workload) -> RunResult:
    from services.engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start = time.perf_counter()
    results = llm.generate(workload.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"pdserve refused {len(errors)} requests, e.g. {errors[0]}")
    return RunResult(seconds, [r.token_ids for r in results])


def load_transformers(model_dir: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as pdserve does here
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """One static batch, left-padded, greedy."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        ids, mask = ids.to(model.device), mask.to(model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, width:].tolist()


def run_transformers(model: Any, workload: Workload, batch_size: int) -> RunResult:
    order = sorted(range(len(workload.prompts)), key=lambda i: workload.output_lens[i])
    tokens: list[list[int]] = [[] for _ in order]
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        lens = [workload.output_lens[i] for i in batch]
        outs = hf_generate(model, [workload.prompts[i] for i in batch], max(lens))
        for i, n, out in zip(batch, lens, outs, strict=True):
            tokens[i] = out[:n]
    return RunResult(time.perf_counter() - start, tokens)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls of `run`, after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(device: str, num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy on `device` (each byte read once and written once), best of `repeats`."""
    import torch

    if device == "cuda":
        num_bytes *= 8  # well past the GPU's L2
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:  # each call ends with the device idle, so the next one times its own copy alone
        dst.copy_(src)
        _synchronize(device)

    return 2 * num_bytes / best_seconds(copy, repeats)


def read_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large tensor's sum on the CPU (each byte read once, nothing written), best of `repeats`."""
    import torch

    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    return num_bytes / best_seconds(src.sum, repeats)


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def decode_weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Bytes of weights one decode step reads: every parameter and packed projection (kernels/cpu_linear.py)
    once, but only a row of an untied embedding."""
    from kernels.cpu_linear import PackedLinear

    seen: dict[int, int] = {}
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens") and not tied:
            continue
        seen[p.data_ptr()] = p.numel() * p.element_size()
    packed = sum(m.weight_bytes for m in model.modules() if isinstance(m, PackedLinear))
    if tied and packed:  # the lm_head reads its packed copy, not the embedding
        packed -= sum(p.numel() * p.element_size() for p in model.get_submodule("embed_tokens").parameters())
    return sum(seen.values()) + packed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="64:512", help="prompt tokens: N or A:B (uniform)")
    parser.add_argument("--output-len", default="16:256", help="output tokens per request: N or A:B (uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16,
                        help="transformers is timed in one batch of all prompts, and in batches of this size")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="pdserve's KV cache size")
    parser.add_argument("--skip-transformers", action="store_true", help="time pdserve only")
    ENGINE_FLAGS.add_to(parser)
    SCHEDULER_FLAGS.add_to(parser)


def _compare_transformers(hf: Any, workload: Workload, batch_size: int, ours: RunResult) -> list[str]:
    """Times transformers at one batch size; lines of its throughput, the ratio and token agreement."""
    num_prompts = len(workload.prompts)
    how = (f"one batch of all {num_prompts} prompts" if batch_size == num_prompts
           else f"batches of {batch_size} sorted by output length")
    _log(f"transformers ({how}) ...")
    theirs = run_transformers(hf, workload, batch_size)
    same = sum(a == b for a, b in zip(ours.tokens, theirs.tokens, strict=True))
    agreed = sum(_common_prefix(a, b) for a, b in zip(ours.tokens, theirs.tokens, strict=True))
    return [
        f"  transformers  {theirs.tokens_per_s(workload):9.1f} output tokens/s  "
        f"({theirs.seconds:.1f}s; generate, {how})",
        f"    ratio       {theirs.seconds / ours.seconds:9.2f}x  (pdserve / transformers tokens/s)",
        f"    greedy tokens identical for {same}/{num_prompts} requests; "
        f"{agreed / workload.num_output_tokens:.1%} of tokens come before the first divergence",
    ]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def _error(message: str) -> int:
    print(f"pdserve bench offline: error: {message}", file=sys.stderr)
    return 2


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Body of `pdserve bench offline`: 0 with the report on stdout, 2 with a message on stderr for bad input."""
    try:
        input_len, output_len = LengthRange.parse(args.input_len), LengthRange.parse(args.output_len)
        _check(args)
        llm = _load_pdserve(args, input_len, output_len)
    except (OSError, ValueError) as e:  # ValueError covers UnsupportedModel and bad engine configs
        return _error(str(e))
    cfg = llm.engine.model_config
    special = {t for t in (cfg.bos_token_id, *cfg.eos_token_ids) if t is not None}
    workload = make_workload(args.num_prompts, input_len, output_len, TokenSpace(cfg.vocab_size, frozenset(special)),
                             args.seed)
    steps = StepLog()
    ours = _time_pdserve(args, llm, workload, input_len, steps)
    lines = _pdserve_lines(args, llm, workload, ours)
    if not args.skip_transformers:
        lines += _transformers_lines(args, llm, workload, ours)
    lines += _decode_step_lines(llm, steps, args.device)
    print("\n".join(lines), flush=True)
    return 0


def _check(args: argparse.Namespace) -> None:
    """Raises ValueError for flags that cannot work."""
    if args.num_prompts < 1 or args.hf_batch_size < 1 or args.kv_cache_gib <= 0:
        raise ValueError("--num-prompts, --hf-batch-size and --kv-cache-gib must be positive")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")


def _load_pdserve(args: argparse.Namespace, input_len: LengthRange, output_len: LengthRange) -> LLM:
    """pdserve's offline engine on `args.model` (the default model if none), if its context holds the lengths."""
    import torch

    from services.engine.llm import LLM
    from services.modelgen.default_model import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = resolve_model(args.model)
    llm = LLM(args.model, kv_cache_bytes=int(args.kv_cache_gib * 2**30), **ENGINE_FLAGS.values(args),
              **SCHEDULER_FLAGS.values(args))
    if input_len.high + output_len.high > llm.engine.max_model_len:
        raise ValueError(f"input {input_len.high} + output {output_len.high} tokens exceed the context "
                         f"of {llm.engine.max_model_len}")
    return llm


def _time_pdserve(args: argparse.Namespace, llm: LLM, workload: Workload, input_len: LengthRange,
                  steps: StepLog) -> RunResult:
    """Warms up, times the workload, then runs one more request alone so that `steps` logs batch-1 decode steps."""
    import torch

    vocab = llm.engine.model_config.vocab_size
    _log(f"model {args.model}: {args.num_prompts} prompts, input {args.input_len}, output {args.output_len}, "
         f"{workload.num_output_tokens} output tokens, torch threads {torch.get_num_threads()}")
    run_pdserve(llm, make_workload(2, LengthRange(8, 8), LengthRange(4, 4), TokenSpace(vocab), 1))  # warm-up
    steps.attach(llm)
    _log("pdserve ...")
    ours = run_pdserve(llm, workload)
    _log(f"pdserve: {ours.seconds:.1f}s")
    run_pdserve(llm, make_workload(1, input_len, LengthRange(32, 32), TokenSpace(vocab), args.seed + 1))
    return ours


def _pdserve_lines(args: argparse.Namespace, llm: LLM, workload: Workload, ours: RunResult) -> list[str]:
    import torch

    return [f"pdserve bench offline: {args.num_prompts} prompts, input {args.input_len}, output {args.output_len} "
            f"tokens (seed {args.seed}), {workload.num_output_tokens} output tokens, greedy, "
            f"{llm.engine.config.torch_dtype_name} on {_device_name(args.device)}, "
            f"torch threads {torch.get_num_threads()}",
            f"  pdserve       {ours.tokens_per_s(workload):9.1f} output tokens/s  ({ours.seconds:.1f}s"
            f"{', CUDA graphs for decode steps' if llm.engine.runner.graphs is not None else ''})"]


def _transformers_lines(args: argparse.Namespace, llm: LLM, workload: Workload, ours: RunResult) -> list[str]:
    import torch

    hf = load_transformers(args.model, args.device, getattr(torch, llm.engine.config.torch_dtype_name))
    hf_generate(hf, [[1] * 8, [2] * 8], 4)  # warm-up
    lines: list[str] = []
    for batch_size in sorted({args.num_prompts, min(args.hf_batch_size, args.num_prompts)}, reverse=True):
        lines += _compare_transformers(hf, workload, batch_size, ours)
    return lines


def _decode_step_lines(llm: LLM, steps: StepLog, device: str) -> list[str]:
    """The decode roofline, and the median pure-decode step time per range of batch sizes against it."""
    weights = decode_weight_bytes(llm.engine.runner.model, llm.engine.model_config.tie_word_embeddings)
    bandwidth = memory_bandwidth(device)
    roofline_ms = weights / bandwidth * 1e3
    lines = [f"  decode roofline: {weights / 2**20:.1f} MiB of weights per step / {bandwidth / 1e9:.1f} GB/s "
             f"({'HBM' if device == 'cuda' else 'DRAM'} tensor copy) = {roofline_ms:.2f} ms per step"]
    for low, high in ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 1 << 30)):
        times = [t for b, ts in steps.decode_s.items() if low <= b <= high for t in ts]
        if times:
            label = f"{low}" if low == high else f"{low}-{high}" if high < 1 << 30 else f"{low}+"
            median_ms = statistics.median(times) * 1e3
            lines.append(f"  pure-decode step, batch {label:>7}: median {median_ms:7.2f} ms over {len(times):4d} steps "
                         f"({median_ms / roofline_ms:4.1f}x roofline)")
    return lines
