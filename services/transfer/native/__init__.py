"""Python side of kvx.c and kvx_route.c, the hand-off's data path: build on first use, then thin ctypes wrappers.

The library is compiled against the UCX headers and libraries of the libucx wheel (the same UCX
that ucxx loads) into `_build/`, keyed by a hash of the sources, so an edited source rebuilds and
concurrent first imports (several Ray actors) never see a half-written file. Calls go through
ctypes, which releases the GIL while C runs: a fetch copies while Python threads go on.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from services.transfer.libucx import libucx_dir

HERE = Path(__file__).parent
SOURCES = (HERE / "kvx.c", HERE / "kvx_route.c")
HEADERS = (HERE / "kvx.h",)
BUILD_DIR = HERE / "_build"

EVENT_MESSAGE = 1
EVENT_PEER_FAILED = 2
EVENT_ROUTE_DONE = 3  # payload: the route's key and when its KV was all in place (ROUTE_DONE)
EVENT_ACKS_DUE = 4  # routed headers wait for their acks: Sink.take_acks
ROUTE_DONE = struct.Struct("<Qd")
_RECORD = struct.Struct("<IiQI")
UCS_ERR_NOT_CONNECTED = -24
UCS_ERR_TIMED_OUT = -20

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
        ("kvx_fetch", i, [p, p, u64, u64, sz, p, p, p, ctypes.c_double]),
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


def _sized(call: object, *args: object) -> bytes:
    """Calls a C function that fills (buffer, capacity) and returns the length or minus what it needs."""
    cap = 1024
    while True:
        buf = ctypes.create_string_buffer(cap)
        n = call(*args, buf, cap)  # type: ignore[operator]
        if n >= 0:
            return buf.raw[:n]
        cap = -n


class Pieces:
    """Runs to copy or fetch, as rows of a [3, n] uint64 array: remote offset, local offset, length.

    Built once per token range and reused by every layer; it holds the row pointers C reads.
    """

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.ascontiguousarray(rows, dtype=np.uint64)
        if self.rows.ndim != 2 or self.rows.shape[0] != 3:
            raise ValueError(f"pieces must be [3, n] rows, got shape {self.rows.shape}")
        self.count = int(self.rows.shape[1])
        base = self.rows.ctypes.data
        self.pointers = (base, base + 8 * self.count, base + 16 * self.count)


class Node:
    """One UCP worker with its progress thread; `event_fd` turns readable when `poll()` has events."""

    def __init__(self) -> None:
        self._lib = lib()
        st = ctypes.c_int()
        self._h = self._lib.kvx_open(ctypes.byref(st))
        if not self._h:
            raise NativeError("creating the UCX worker failed", st.value)
        self.event_fd = int(self._lib.kvx_event_fd(self._h))
        self.address = _sized(self._lib.kvx_address, self._h)
        self._poll_buf = ctypes.create_string_buffer(1 << 16)

    def poll(self, woken: bool = True) -> list[tuple[int, int, int, bytes]]:
        """Every queued event as (kind, status, tag, payload), oldest first.

        `woken`: the caller woke on `event_fd`, which this clears (after `spin`, pass False).
        """
        if woken:
            try:
                os.read(self.event_fd, 8)
            except BlockingIOError:
                pass
        events: list[tuple[int, int, int, bytes]] = []
        while True:
            n = self._lib.kvx_poll(self._h, self._poll_buf, len(self._poll_buf))
            if n == 0:
                return events
            if n < 0:
                self._poll_buf = ctypes.create_string_buffer(-n)
                continue
            raw = ctypes.string_at(self._poll_buf, n)
            at = 0
            while at < n:
                kind, status, tag, length = _RECORD.unpack_from(raw, at)
                at += _RECORD.size
                events.append((kind, status, tag, raw[at : at + length]))
                at += length

    def spin(self, timeout_s: float) -> bool:
        """Progress in this thread until an event is queued (True) or timeout_s passes (False).

        From the first call until `spin_end`, the progress thread stands by and the worker stays
        unarmed, so a peer's messages arrive without a wake-up signal (about 10 us less per send
        here). Call `poll` after True; call `spin_end` when done.
        """
        return bool(self._lib.kvx_spin(self._h, timeout_s))

    def spin_end(self) -> None:
        """Give progress back to the progress thread."""
        self._lib.kvx_spin_end(self._h)

    def set_spin(self, spin_s: float) -> None:
        """After placing part of a routed request, the progress thread polls this long for the rest."""
        self._lib.kvx_set_spin(self._h, spin_s)

    def sink(self, cache: int, num_layers: int, plane_bytes: int, token_bytes: int, block_size: int) -> Sink:
        """The KV cache at `cache` ([num_layers, 2, blocks, block_size, heads, dim]) as a sink for routes."""
        h = self._lib.kvx_sink_open(self._h, cache, num_layers, plane_bytes, token_bytes, block_size)
        if not h:
            raise MemoryError("opening a KV sink")
        return Sink(self._lib, h)

    def connect(self, address: bytes, tag: int, local_tag: int) -> Connection:
        """An endpoint to the node at `address`; messages carry `tag`, failures report `local_tag`."""
        st = ctypes.c_int()
        h = self._lib.kvx_connect(self._h, address, tag, local_tag, ctypes.byref(st))
        if not h:
            raise NativeError("connecting to the peer's UCX worker failed", st.value)
        return Connection(self._lib, h)

    def register(self, address: int, length: int) -> Region:
        """Existing memory, made reachable by peers."""
        st = ctypes.c_int()
        h = self._lib.kvx_register(self._h, address, length, ctypes.byref(st))
        if not h:
            raise NativeError("registering memory with UCX failed", st.value)
        return Region(self._lib, h, address, length)

    def allocate(self, length: int) -> Region:
        """New memory that UCX allocates (shared memory on one host, which peers map directly)."""
        st = ctypes.c_int()
        address = ctypes.c_uint64()
        h = self._lib.kvx_allocate(self._h, length, ctypes.byref(address), ctypes.byref(st))
        if not h:
            raise NativeError(f"allocating {length} bytes through UCX failed", st.value)
        return Region(self._lib, h, address.value, length)

    def close(self) -> None:
        if self._h:
            self._lib.kvx_close(self._h)
            self._h = None


class Connection:
    """An endpoint to a peer's node. Thread-safe: `close` waits for a send or fetch in progress."""

    def __init__(self, so: ctypes.CDLL, handle: int) -> None:
        self._lib = so
        self._h: int | None = handle
        self._lock = threading.Lock()

    def send(self, message: bytes) -> None:
        with self._lock:
            st = self._lib.kvx_send(self._h, message, len(message)) if self._h else UCS_ERR_NOT_CONNECTED
        if st:
            raise NativeError("sending a KV message failed", st)

    def send_staged(self, destination: int, k: int, v: int, half: int, message: bytes) -> None:
        """Copy `half` bytes from k, then from v, to destination (host memory), then `send(message)`."""
        with self._lock:
            st = (
                self._lib.kvx_send_staged(self._h, destination, k, v, half, message, len(message))
                if self._h
                else UCS_ERR_NOT_CONNECTED
            )
        if st:
            raise NativeError("sending a KV message failed", st)

    def unpack(self, rkey: bytes) -> RemoteKey:
        """A peer region's packed rkey, ready for `fetch` (unpack once per region and reuse)."""
        st = ctypes.c_int()
        with self._lock:
            h = self._lib.kvx_unpack(self._h, rkey, ctypes.byref(st)) if self._h else None
        if not h:
            raise NativeError("unpacking a remote key failed", st.value if self._h else UCS_ERR_NOT_CONNECTED)
        return RemoteKey(self._lib, h)

    def fetch(self, rkey: RemoteKey, remote_base: int, local_base: int, pieces: Pieces, timeout_s: float) -> None:
        """Get the pieces and wait.

        Raises NativeError (status UCS_ERR_TIMED_OUT past `timeout_s`, after which the connection
        is closed).
        """
        with self._lock:
            st = (
                self._lib.kvx_fetch(
                    self._h, rkey.handle, remote_base, local_base, pieces.count, *pieces.pointers, timeout_s
                )
                if self._h
                else UCS_ERR_NOT_CONNECTED
            )
        if st:
            raise NativeError("fetching KV failed", st)

    def close(self, flush_timeout_s: float = 0.0) -> None:
        """Close; with flush_timeout_s > 0, messages sent so far get that long to go out first."""
        with self._lock:
            h, self._h = self._h, None
        if h:
            self._lib.kvx_disconnect(h, flush_timeout_s)


def copy_kv(k_source: int, v_source: int, k_local: int, v_local: int, pieces: Pieces) -> None:
    """`Connection.fetch` of K and of V from memory mapped into this process (`RemoteKey.local_address`)."""
    lib().kvx_copy_kv(k_source, v_source, k_local, v_local, pieces.count, *pieces.pointers)


def prefault(address: int, length: int) -> None:
    """Map every page of memory mapped from a peer now, so that no copy takes a fault on first touch."""
    err = lib().kvx_prefault(address, length)
    if err:
        raise OSError(err, f"mapping {length} bytes of a peer's region: {os.strerror(err)}")


class Sink:
    """A KV cache that routed headers are placed into from the message callback (see kvx_route.c).

    `source` names a connection (by its tag) whose sender's cache is mapped here; `route` one
    expected request. A header from a source for a routed request is copied into place and its
    sequence kept for `take_acks`, with no event; the route's completion is an EVENT_ROUTE_DONE.
    Everything else arrives as EVENT_MESSAGE, as without a sink. `unroute`, `unsource` and
    `close` are synchronous: once they return, nothing more is written through what they removed.
    """

    def __init__(self, so: ctypes.CDLL, handle: int) -> None:
        self._lib = so
        self._h: int | None = handle
        self._acks = (ctypes.c_uint64 * 256)()

    def source(self, tag: int, address: int, length: int, mapped: int) -> None:
        err = self._lib.kvx_sink_source(self._h, tag, address, length, mapped)
        if err:
            raise OSError(err, f"adding a source for tag {tag}: {os.strerror(err)}")

    def unsource(self, tag: int) -> None:
        self._lib.kvx_sink_unsource(self._h, tag)

    def take_acks(self, tag: int) -> list[int]:
        """The sequences placed from `tag`'s source since the last call."""
        while True:
            n = self._lib.kvx_sink_take_acks(self._h, tag, self._acks, len(self._acks))
            if n >= 0:
                return self._acks[:n]
            self._acks = (ctypes.c_uint64 * (2 * -n))()

    def route(self, key: int, request_id: bytes, token_start: int, slots: list[int]) -> int:
        """Route a request whose tokens from `token_start` go to `slots` (checked by the caller); a handle."""
        table = array.array("Q", slots)
        h = self._lib.kvx_route_open(
            self._h, key, request_id, len(request_id), token_start, len(table), table.buffer_info()[0]
        )
        if not h:
            raise ValueError(f"cannot route request {request_id!r} (routed already, or no memory)")
        return int(h)

    def unroute(self, route: int) -> None:
        self._lib.kvx_route_close(route)

    def mark(self, route: int, layer: int, a: int, b: int) -> bool:
        """Record tokens [a, b) of `layer` as written by the caller; True when that completed the route."""
        return bool(self._lib.kvx_route_mark(route, layer, a, b))

    def route_source(self, route: int) -> int:
        """The tag of the source that placed KV through the route (0: none)."""
        return int(self._lib.kvx_route_source(route))

    def close(self) -> None:
        h, self._h = self._h, None
        if h:
            self._lib.kvx_sink_close(h)


class RemoteKey:
    """An unpacked rkey of a peer's region; close it before its connection."""

    def __init__(self, so: ctypes.CDLL, handle: int) -> None:
        self._lib = so
        self.handle: int | None = handle

    def local_address(self, remote: int) -> int:
        """Where the peer's address is mapped in this process (shared memory), or 0."""
        return int(self._lib.kvx_rkey_ptr(self.handle, remote))

    def close(self) -> None:
        if self.handle:
            h, self.handle = self.handle, None
            self._lib.kvx_rkey_destroy(h)


class Region:
    """Memory known to UCX; `rkey` is what a peer needs to fetch from it."""

    def __init__(self, so: ctypes.CDLL, handle: int, address: int, length: int) -> None:
        self._lib = so
        self._h: int | None = handle
        self.address = address
        self.length = length
        self.rkey = _sized(so.kvx_region_rkey, handle)

    def close(self) -> None:
        if self._h:
            h, self._h = self._h, None
            self._lib.kvx_unregister(h)
