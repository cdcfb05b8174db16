"""The CPU path of paged attention: decodes read K and V in place in a small C kernel (cpu_decode.c),
prefill chunks go through the torch reference.

The reference (attention.paged_attention_ref) gathers each decode's blocks into a dense [B, L, Hk, D] copy
before attending: at batch 32 and 256 tokens that is 16 MiB written and read again per layer, and about 20
small tensor ops per layer at batch 1. The kernel walks the block table instead: one pass over K, a softmax,
one pass over V, with no copy and no mask (slots past a context are never read).

The kernel is compiled with the system C compiler on first use into `_build/`, keyed by a hash of the
source and the compiler flags. It reads a float32, float16 or bfloat16 cache (`--kv-cache-dtype`) and computes in
float32. Without a compiler, or for queries other than float32, the reference runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCE = HERE / "cpu_decode.c"
BUILD_DIR = HERE / "_build"
# -ffast-math lets the compiler vectorise the dot products' sums and expf (libmvec); slots past a context
# are never read, so no NaN or infinity reaches the arithmetic but the -inf a running maximum starts from.
# It is a compile flag only: a library linked with it carries GCC's crtfastmath, which on load sets the
# loading process's floating-point mode to flush subnormals to zero, in torch's arithmetic too.
# -fopenmp: the kernel splits its decodes over the OpenMP team of torch, whose libgomp (soname libgomp.so.1) is
# loaded before the library and so is the one it binds to. Its own pthreads had to share the cores with that
# team's threads, which spin between torch's operators: on the peers' offline batch the kernel took 1.0 s on
# two pthreads, 0.78 s on one thread, 0.49 s on torch's two (services/bench/README.md).
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-fopenmp", "-Wall")
LDFLAGS = ("-shared", "-fopenmp")
# The kernel's entry point for each dtype of the KV cache it reads; queries and outputs are float32.
ENTRY_POINTS = {torch.float32: "pd_decode_attention", torch.float16: "pd_decode_attention_f16",
                torch.bfloat16: "pd_decode_attention_bf16"}
# Decodes whose K and V together take less than this run on the calling thread alone: waking the team's
# other threads costs up to tens of microseconds, about what reading this much takes.
THREAD_MIN_BYTES = 2**20

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}
use_native = True  # False: every CPU call runs the torch reference (benchmarks compare the two)


def build() -> Path:
    """Compiles cpu_decode.c unless this source and these flags are built already; returns the library."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode() + _cpu_flags()).hexdigest()[:16]
    target = BUILD_DIR / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    BUILD_DIR.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, *CFLAGS, "-c", "-o", tmp + ".o", str(SOURCE)], check=True, capture_output=True, text=True)
        subprocess.run([cc, *LDFLAGS, "-o", tmp, tmp + ".o", "-lm"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        os.unlink(tmp)
        raise RuntimeError(f"building {SOURCE.name} failed: {getattr(exc, 'stderr', '') or exc}") from None
    finally:
        Path(tmp + ".o").unlink(missing_ok=True)
    os.replace(tmp, target)
    return target


def _cpu_flags() -> bytes:
    """-march=native code differs by CPU: hosts sharing the source tree keep a library each."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot be built (logged once)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            try:
                so = ctypes.CDLL(str(build()))
            except (OSError, RuntimeError) as exc:
                log.warning("CPU decode attention kernel unavailable, using the torch reference: %s", exc)
                _state["lib"] = None
            else:
                p, lng = ctypes.c_void_p, ctypes.c_long
                for name in ENTRY_POINTS.values():
                    fn = getattr(so, name)
                    fn.argtypes = [p, lng, lng, p, lng, p, lng, p, p, lng, lng, lng, lng, lng, ctypes.c_float,
                                   p, lng, lng, p, lng, ctypes.c_int]
                    fn.restype = None
                _state["lib"] = so
    return _state["lib"]


def decode_in_place(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    decode_lens: list[int],
) -> bool:
    """Writes out[row] for every sequence with one query row; False (nothing written) where the kernel
    cannot take these tensors. decode_lens: the context lengths of those sequences. The kernel trusts the
    block table's entries below each context to name blocks of kv_layer, as the Triton kernel does."""
    so = library() if use_native else None
    if so is None or q.dtype != torch.float32 or kv_layer.dtype not in ENTRY_POINTS or q.stride(-1) != 1:
        return False
    if not decode_lens:
        return True
    kv = kv_layer.contiguous()
    tables, lens, starts = (t.to(torch.int64).contiguous() for t in (block_tables, context_lens, query_start_loc))
    _, num_blocks, block_size, num_kv_heads, head_dim = kv.shape
    if max(decode_lens) > tables.shape[1] * block_size:
        raise ValueError(f"paged_attention: a context of {max(decode_lens)} tokens overruns its block table")
    token_bytes = 2 * num_kv_heads * head_dim * kv.element_size()
    threads = torch.get_num_threads() if sum(decode_lens) * token_bytes >= THREAD_MIN_BYTES else 1
    per_thread = q.shape[1] * max(decode_lens) + num_kv_heads * head_dim  # scores, then one token row widened
    scratch = torch.empty(threads * per_thread, dtype=torch.float32)
    getattr(so, ENTRY_POINTS[kv.dtype])(
        q.data_ptr(), q.stride(0), q.stride(1), kv.data_ptr(), num_blocks, tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), starts.data_ptr(), lens.shape[0], block_size, q.shape[1], num_kv_heads, head_dim,
        scale, out.data_ptr(), out.stride(0), out.stride(1), scratch.data_ptr(), per_thread, threads,
    )  # fmt: skip
    return True


if __name__ == "__main__":  # `python -m kernels.cpu_attention`: build it ahead (make setup, the CPU image)
    print(build())
