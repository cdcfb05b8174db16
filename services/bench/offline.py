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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.bench.datasets import LengthRange, TokenSpace

if TYPE_CHECKING:
    import torch

    from services.engine.llm import LLM


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


def memory_bandwidth(device: str, num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy on `device` (each byte read once and written once), best of `repeats`."""
    import torch

    if device == "cuda":
        num_bytes *= 8  # well past the GPU's L2
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def decode_weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Bytes of weights one decode step reads: every parameter once, but only a row of an untied embedding."""
    seen: dict[int, int] = {}
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens") and not tied:
            continue
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="64:512", help="prompt tokens: N or A:B (uniform)")
    parser.add_argument("--output-len", default="16:256", help="output tokens per request: N or A:B (uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-size", type=int, default=16,
                        help="transformers is timed in one batch of all prompts, and in batches of this size")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights and activations (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="pdserve's KV cache size")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for pdserve's decode steps")
    parser.add_argument("--skip-transformers", action="store_true", help="time pdserve only")


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
    try:
        input_len, output_len = LengthRange.parse(args.input_len), LengthRange.parse(args.output_len)
    except ValueError as e:
        return _error(str(e))
    if args.num_prompts < 1 or args.hf_batch_size < 1 or args.kv_cache_gib <= 0:
        return _error("--num-prompts, --hf-batch-size and --kv-cache-gib must be positive")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: no CUDA device is available")

    from services.engine.errors import UnsupportedModel
    from services.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from services.engine.make_model import default_model_dir

        args.model = str(default_model_dir())
    try:
        llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_bytes=int(args.kv_cache_gib * 2**30), device=args.device, dtype=args.dtype,
                  enforce_eager=args.enforce_eager)
    except (OSError, UnsupportedModel, ValueError) as e:
        return _error(str(e))
    cfg = llm.engine.model_config
    dtype_name = llm.engine.config.torch_dtype_name
    if input_len.high + output_len.high > llm.engine.max_model_len:
        return _error(f"input {input_len.high} + output {output_len.high} tokens exceed the context "
                      f"of {llm.engine.max_model_len}")
    special = {t for t in (cfg.bos_token_id, *cfg.eos_token_ids) if t is not None}
    workload = make_workload(args.num_prompts, input_len, output_len, TokenSpace(cfg.vocab_size, frozenset(special)),
                             args.seed)

    _log(f"model {args.model}: {args.num_prompts} prompts, input {args.input_len}, output {args.output_len}, "
         f"{workload.num_output_tokens} output tokens, torch threads {torch.get_num_threads()}")
    run_pdserve(llm, make_workload(2, LengthRange(8, 8), LengthRange(4, 4), TokenSpace(cfg.vocab_size), 1))  # warm-up
    steps = StepLog()
    steps.attach(llm)
    _log("pdserve ...")
    ours = run_pdserve(llm, workload)
    _log(f"pdserve: {ours.seconds:.1f}s")
    run_pdserve(llm, make_workload(1, input_len, LengthRange(32, 32), TokenSpace(cfg.vocab_size), args.seed + 1))

    lines = [f"pdserve bench offline: {args.num_prompts} prompts, input {args.input_len}, output {args.output_len} "
             f"tokens (seed {args.seed}), {workload.num_output_tokens} output tokens, greedy, {dtype_name} on "
             f"{_device_name(args.device)}, torch threads {torch.get_num_threads()}",
             f"  pdserve       {ours.tokens_per_s(workload):9.1f} output tokens/s  ({ours.seconds:.1f}s"
             f"{', CUDA graphs for decode steps' if llm.engine.runner.graphs is not None else ''})"]
    if not args.skip_transformers:
        hf = load_transformers(args.model, args.device, getattr(torch, dtype_name))
        hf_generate(hf, [[1] * 8, [2] * 8], 4)  # warm-up
        for batch_size in sorted({args.num_prompts, min(args.hf_batch_size, args.num_prompts)}, reverse=True):
            lines += _compare_transformers(hf, workload, batch_size, ours)
    weights = decode_weight_bytes(llm.engine.runner.model, cfg.tie_word_embeddings)
    bandwidth = memory_bandwidth(args.device)
    roofline_ms = weights / bandwidth * 1e3
    lines.append(f"  decode roofline: {weights / 2**20:.1f} MiB of weights per step / {bandwidth / 1e9:.1f} GB/s "
                 f"({'HBM' if args.device == 'cuda' else 'DRAM'} tensor copy) = {roofline_ms:.2f} ms per step")
    for low, high in ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128), (129, 1 << 30)):
        times = [t for b, ts in steps.decode_s.items() if low <= b <= high for t in ts]
        if times:
            label = f"{low}" if low == high else f"{low}-{high}" if high < 1 << 30 else f"{low}+"
            median_ms = statistics.median(times) * 1e3
            lines.append(f"  pure-decode step, batch {label:>7}: median {median_ms:7.2f} ms over {len(times):4d} steps "
                         f"({median_ms / roofline_ms:4.1f}x roofline)")
    print("\n".join(lines), flush=True)
    return 0
