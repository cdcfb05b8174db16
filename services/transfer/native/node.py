"""The data path's UCP worker (`Node`) and its endpoints to peers (`Connection`)."""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from typing import NamedTuple

from services.transfer.native.library import UCS_ERR_NOT_CONNECTED, NativeError, lib, sized
from services.transfer.native.memory import Pieces, Region, RemoteKey
from services.transfer.native.sink import Sink
from services.transfer.ucx_formats import padded

EVENT_MESSAGE = 1
EVENT_PEER_FAILED = 2
_RECORD = struct.Struct("<IiQI")


class Lane(NamedTuple):
    """One lane of an endpoint: a UCX transport ("tcp", "cma", "rc_mlx5", ...) on a device ("eth0", "memory", ...)."""

    transport: str
    device: str


class Node:
    """One UCP worker with its progress thread; `event_fd` turns readable when `poll()` has events."""

    def __init__(self) -> None:
        self._lib = lib()
        st = ctypes.c_int()
        self._h = self._lib.kvx_open(ctypes.byref(st))
        if not self._h:
            raise NativeError("creating the UCX worker failed", st.value)
        self.event_fd = int(self._lib.kvx_event_fd(self._h))
        self.address = sized(self._lib.kvx_address, self._h)
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
        unarmed, so a peer's messages arrive without a wake-up signal (see services/bench/README.md
        for what that saves). Call `poll` after True; call `spin_end` when done.
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
        """An endpoint to the node at `address`; messages carry `tag`, failures report `local_tag`.

        UCX reads `address` without a length: walk a peer's with ucx_formats.address_problem first.
        """
        st = ctypes.c_int()
        h = self._lib.kvx_connect(self._h, padded(address), tag, local_tag, ctypes.byref(st))
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
        """A peer region's packed rkey, ready for `fetch` (unpack once per region and reuse).

        UCX reads `rkey` without a length: walk a peer's with ucx_formats.rkey_problem first.
        """
        st = ctypes.c_int()
        with self._lock:
            h = self._lib.kvx_unpack(self._h, padded(rkey), ctypes.byref(st)) if self._h else None
        if not h:
            raise NativeError("unpacking a remote key failed", st.value if self._h else UCS_ERR_NOT_CONNECTED)
        return RemoteKey(self._lib, h)

    def fetch(self, rkey: RemoteKey, remote_base: int, local_base: int, pieces: Pieces, timeout_s: float) -> None:
        """Get the pieces and wait (for them and for every get `post`ed before).

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

    def post(self, rkey: RemoteKey, remote_base: int, local_base: int, pieces: Pieces) -> None:
        """Start getting the pieces and return: `wait` waits for every get posted so far.

        The local memory must stay put until then (the pieces may go at once).
        """
        with self._lock:
            st = (
                self._lib.kvx_fetch_post(self._h, rkey.handle, remote_base, local_base, pieces.count, *pieces.pointers)
                if self._h
                else UCS_ERR_NOT_CONNECTED
            )
        if st:
            raise NativeError("fetching KV failed", st)

    def wait(self, timeout_s: float) -> None:
        """Until every get `post`ed has landed; NativeError as `fetch` raises it (after which none is in flight)."""
        with self._lock:
            st = self._lib.kvx_fetch_wait(self._h, timeout_s) if self._h else UCS_ERR_NOT_CONNECTED
        if st:
            raise NativeError("fetching KV failed", st)

    def transports(self) -> list[Lane]:
        """The UCX transport and device of each of the endpoint's lanes, as UCX chose them ([] once closed).

        Lanes to the peer's own process show as "self"; several lanes may share a transport.
        """
        with self._lock:
            raw = sized(self._lib.kvx_transports, self._h) if self._h else b""
        return [Lane(*line.split(" ", 1)) for line in raw.decode().splitlines() if " " in line]

    def answer_gets(self, on: bool = True) -> None:
        """The peer reads this side's memory with gets that this worker answers (tcp): after each send, the
        progress thread stays awake for the node's spin time to answer them."""
        with self._lock:
            if self._h:
                self._lib.kvx_answer_gets(self._h, int(on))

    def close(self, flush_timeout_s: float = 0.0) -> None:
        """Close; with flush_timeout_s > 0, messages sent so far get that long to go out first."""
        with self._lock:
            h, self._h = self._h, None
        if h:
            self._lib.kvx_disconnect(h, flush_timeout_s)
