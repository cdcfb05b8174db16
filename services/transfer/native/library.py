"""Building kvx.c and kvx_route.c into a shared library on first use, and loading it through ctypes.

The library is compiled against the UCX headers and libraries of the libucx wheel (the same UCX
that ucxx-cu12 installs) into `_build/`, keyed by a hash of the sources, so an edited source rebuilds and
concurrent first imports (several Ray actors) never see a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from services.transfer.libucx import libucx_dir

HERE = Path(__file__).parent
SOURCES = (HERE / "kvx.c", HERE / "kvx_route.c")
HEADERS = (HERE / "kvx.h",)
BUILD_DIR = HERE / "_build"

UCS_ERR_NOT_CONNECTED = -24
UCS_ERR_TIMED_OUT = -20
UCS_ERR_INVALID_ADDR = -7

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class NativeError(RuntimeError):
    """A UCX call of the data path failed; `status` is the ucs_status_t."""

    def __init__(self, what: str, status: int) -> None:
        super().__init__(f"{what}: {status_string(status)}")
        self.status = status


def build() -> Path:
    """Compile the sources if this version of them is not built yet; returns the shared library's path."""
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))).hexdigest()[:16]
    target = BUILD_DIR / f"kvx-{digest}.so"
    if target.exists():
        return target
    BUILD_DIR.mkdir(exist_ok=True)
    ucx = libucx_dir()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    cmd = [
        os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-Wall", "-o", tmp, *map(str, SOURCES),
        f"-I{ucx / 'include'}", f"-L{ucx / 'lib'}", f"-Wl,-rpath,{ucx / 'lib'}", "-lucp", "-lucs", "-lpthread",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        os.unlink(tmp)
        raise RuntimeError(f"building {', '.join(f.name for f in SOURCES)} failed:\n{exc.stderr}") from None
    os.replace(tmp, target)
    return target


def lib() -> ctypes.CDLL:
    """The loaded library (built first if need be), its functions declared."""
    global _lib
    so = _lib
    if so is not None:
        return so
    with _lock:
        if _lib is None:
            _lib = _declare(ctypes.CDLL(str(build())))
        return _lib


def _declare(so: ctypes.CDLL) -> ctypes.CDLL:
    p, i, u64, sz, lng = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_long
    u32, dbl = ctypes.c_uint32, ctypes.c_double
    status = ctypes.POINTER(ctypes.c_int)
    for name, res, args in (
        ("kvx_status_string", ctypes.c_char_p, [i]),
        ("kvx_open", p, [status]),
        ("kvx_close", None, [p]),
        ("kvx_event_fd", i, [p]),
        ("kvx_address", lng, [p, p, sz]),
        ("kvx_poll", lng, [p, p, sz]),
        ("kvx_connect", p, [p, p, u64, u64, status]),
        ("kvx_disconnect", None, [p, ctypes.c_double]),
        ("kvx_transports", lng, [p, p, sz]),
        ("kvx_answer_gets", None, [p, i]),
        ("kvx_send", i, [p, p, sz]),
        ("kvx_send_staged", i, [p, u64, u64, u64, sz, p, sz]),
        ("kvx_register", p, [p, p, sz, status]),
        ("kvx_region_rkey", lng, [p, p, sz]),
        ("kvx_unregister", None, [p]),
        ("kvx_allocate", p, [p, sz, ctypes.POINTER(u64), status]),
        ("kvx_unpack", p, [p, p, status]),
        ("kvx_rkey_destroy", None, [p]),
        ("kvx_rkey_ptr", u64, [p, u64]),
        ("kvx_prefault", i, [u64, sz]),
        ("kvx_shared_mapping", i, [u64, sz]),
        ("kvx_pages_mapped", i, [u64, sz]),
        ("kvx_fetch", i, [p, p, u64, u64, sz, p, p, p, ctypes.c_double]),
        ("kvx_fetch_post", i, [p, p, u64, u64, sz, p, p, p]),
        ("kvx_fetch_wait", i, [p, ctypes.c_double]),
        ("kvx_copy_kv", None, [u64, u64, u64, u64, sz, p, p, p]),
        ("kvx_spin", i, [p, ctypes.c_double]),
        ("kvx_spin_end", None, [p]),
        ("kvx_set_spin", None, [p, dbl]),
        ("kvx_sink_open", p, [p, u64, u32, u64, u64, u32]),
        ("kvx_sink_close", None, [p]),
        ("kvx_sink_source", i, [p, u64, u64, u64, u64]),
        ("kvx_sink_take_acks", lng, [p, u64, p, sz]),
        ("kvx_sink_unsource", None, [p, u64]),
        ("kvx_route_open", p, [p, u64, ctypes.c_char_p, u32, u32, u32, p]),
        ("kvx_route_close", None, [p]),
        ("kvx_route_mark", i, [p, u32, u32, u32]),
        ("kvx_route_source", u64, [p]),
    ):
        fn = getattr(so, name)
        fn.restype = res
        fn.argtypes = args
    return so


def status_string(status: int) -> str:
    return str(lib().kvx_status_string(status).decode())


def sized(call: object, *args: object) -> bytes:
    """Calls a C function that fills (buffer, capacity) and returns the length or minus what it needs."""
    cap = 1024
    while True:
        buf = ctypes.create_string_buffer(cap)
        n = call(*args, buf, cap)  # type: ignore[operator]
        if n >= 0:
            return buf.raw[:n]
        cap = -n
