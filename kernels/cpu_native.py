"""The CPU kernels in C, built into one library: decode attention over the paged cache (cpu_decode.c), prompt
attention over it (cpu_prefill.c), products of a few rows with a row-major weight (cpu_rows.c), RMSNorm fused with
the residual add (cpu_norm.c), the rotary embedding fused with the store of the new K and V (cpu_rope.c), SwiGLU's
gate (cpu_swiglu.c), and every layer of a decode step of a few rows in one call (cpu_layers.c). cpu_kernels.h
holds the pieces they share.

The library is compiled with the system C compiler on first use into `_build/`, keyed by a hash of the sources,
the compiler flags and the CPU's flags. Without a compiler the callers fall back to torch (logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_decode.c", HERE / "cpu_rows.c", HERE / "cpu_norm.c", HERE / "cpu_rope.c",
           HERE / "cpu_swiglu.c", HERE / "cpu_layers.c", HERE / "cpu_prefill.c")
HEADERS = (HERE / "cpu_kernels.h",)  # the pieces the sources share
BUILD_DIR = HERE / "_build"
# -ffast-math lets the compiler vectorise the dot products' sums; slots past a context are never read, so no
# NaN or infinity reaches the arithmetic but the -inf a running maximum starts from. It is a compile flag
# only: a library linked with it carries GCC's crtfastmath, which on load sets the loading process's
# floating-point mode to flush subnormals to zero, in torch's arithmetic too. -fno-finite-math-only leaves
# __FAST_MATH__ undefined, and with it math.h's declarations of glibc's vector functions (libmvec): a source
# that wants expf 16 lanes at a time declares it (cpu_swiglu.c).
# -fopenmp: the kernels split their work over the OpenMP team of torch, whose libgomp (soname libgomp.so.1) is
# loaded before the library and so is the one it binds to. Pthreads of their own had to share the cores with
# that team's threads, which spin between torch's operators: on the peers' offline batch the attention kernel
# took 1.0 s on two pthreads, 0.78 s on one thread, 0.49 s on torch's two (services/bench/README.md).
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fPIC", "-fopenmp", "-Wall")
LDFLAGS = ("-shared", "-fopenmp")
# libmvec: glibc's vector math, which those declarations call (x86-64 only)
LIBS = ("-lm", "-lmvec") if platform.machine() in ("x86_64", "AMD64") else ("-lm",)
# The row-wise kernels (cpu_norm.c, cpu_swiglu.c) over fewer elements than this run on the calling thread alone:
# a decode step's rows, where waking the team's other threads costs more than it saves.
THREAD_MIN_ELEMENTS = 2**16
# The KV cache's element types the kernels read and write (kv_type in cpu_kernels.h; --kv-cache-dtype): the
# arithmetic is float32 whatever the cache holds.
KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def build() -> Path:
    """Compiles the sources unless these sources and flags are built already for this CPU; returns the library."""
    text = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join(CFLAGS + LDFLAGS + LIBS).encode() + _cpu_flags()).hexdigest()[:16]
    target = BUILD_DIR / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    BUILD_DIR.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    objects = [f"{tmp}.{source.stem}.o" for source in SOURCES]
    cc = os.environ.get("CC", "cc")
    try:
        for source, obj in zip(SOURCES, objects, strict=True):
            subprocess.run([cc, *CFLAGS, "-c", "-o", obj, str(source)], check=True, capture_output=True, text=True)
        subprocess.run([cc, *LDFLAGS, "-o", tmp, *objects, *LIBS], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        os.unlink(tmp)
        raise RuntimeError(f"building the CPU kernels failed: {getattr(exc, 'stderr', '') or exc}") from None
    finally:
        for obj in objects:
            Path(obj).unlink(missing_ok=True)
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
    """The loaded kernels, or None where they cannot be built (logged once)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            try:
                so = ctypes.CDLL(str(build()))
            except (OSError, RuntimeError) as exc:
                log.warning("CPU kernels unavailable, using torch instead: %s", exc)
                _state["lib"] = None
            else:
                _declare(so)
                _state["lib"] = so
    return _state["lib"]


def _declare(so: ctypes.CDLL) -> None:
    p, lng, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    so.pd_decode_attention.argtypes = [p, lng, lng, p, i, lng, p, lng, p, p, lng, lng, lng, lng, lng, ctypes.c_float,
                                       p, lng, lng, p, lng, i]
    so.pd_decode_attention.restype = None
    so.pd_few_rows.argtypes = [p, lng, lng, p, lng, lng, p, lng, i]
    so.pd_few_rows.restype = None
    so.pd_rms_norm.argtypes = [p, lng, p, lng, p, lng, lng, ctypes.c_float, p, lng, p, lng, i]
    so.pd_rms_norm.restype = None
    so.pd_rope_store.argtypes = [p, lng, lng, lng, p, lng, lng, p, lng, lng, lng, lng, p, p, lng, p, i, lng, p, lng, i]
    so.pd_rope_store.restype = lng
    so.pd_silu_mul.argtypes = [p, lng, lng, lng, p, lng, i]
    so.pd_silu_mul.restype = None
    so.pd_prefill_attention_scratch.argtypes = [lng]
    so.pd_prefill_attention_scratch.restype = lng
    so.pd_prefill_attention.argtypes = [p, lng, lng, p, i, lng, p, lng, p, p, lng, lng, lng, lng, lng,
                                        ctypes.c_float, p, lng, lng, p, lng, i]
    so.pd_prefill_attention.restype = lng
    so.pd_decode_layers_scratch.argtypes = [p, lng, lng, i]
    so.pd_decode_layers_scratch.restype = lng
    so.pd_decode_layers.argtypes = [p, p, lng, p, p, p, lng, p, p, i, lng, lng, p, p, i]
    so.pd_decode_layers.restype = lng


if __name__ == "__main__":  # `python -m kernels.cpu_native`: build it ahead (make setup, the CPU image)
    print(build())
