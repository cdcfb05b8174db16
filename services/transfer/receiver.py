"""Decode side of the KV hand-off: accepts prefill connections and copies their KV into `kv_cache`.

For each KVHeader a sender announces (see sender.py), the receiver checks it against the
request's expectation, copies K and V straight into the request's slots, one piece per run of
slots consecutive on both sides, and acknowledges, so the sender can let go of its memory. The
copy comes from the sender's shared KV cache or its staging ring, through the mapping UCX gives
of them (same host; the cache is mapped in full when the connection opens); from a cache it
cannot map (another host), as RMA gets straight into place; from a ring it cannot map, as one
RMA get into a bounce buffer and then copies; from tensors registered in place (CUDA), as RMA
gets, piece by piece. All of it happens synchronously on the event loop (ctypes drops the GIL
while C copies), so once a header is handled its KV is in place, and when a request is
cancelled nothing is left in flight that could still write into blocks that may already belong
to someone else. Headers of unknown, cancelled or failed requests are acknowledged without
copying.

On a host KV cache the common case skips Python altogether: each expected request is a route,
and each connection whose sender's cache is mapped here a source, of a native.Sink. A header
from a source for a routed request is checked, copied and kept for its ack by the data path's
message callback (native/kvx_route.c), as this module would; Python wakes once, when the
request's KV is all in place (and when acks fall due). Anything else (malformed, out of bounds,
from a ring, for a request not routed) reaches `_on_events` as before, which also refuses what
is bad. Removing a route or a source waits for a placement in progress, so cancelling still
leaves nothing in flight. `pdserve bench transfer --sizes-mib 1,8,64 --rounds 2 --no-perftest`, runs alternating
with routes turned off and on: at 8 MiB per request (32 headers of 256 KiB), 6.0 and 3.4 GB/s with
every header handled here against 11.2 and 11.0 with routes; at 1 MiB 1.3 against 3.0; at 64 MiB
10.7 and 7.8 against 13.1 and 12.9.

While a request's layers are arriving, the event loop does not go back to sleep between
headers: it polls the data-path worker for up to `spin_us` (ucx_runtime), so the next header
lands without a wake-up on either side; the data path's progress thread does the same after
placing part of a routed request. Measured here, a header posted to a sleeping receiver
costs the prefill thread about 12 us (UCX signals the peer through a socket), and 2 us to a
polling one. `pdserve bench transfer` with it against `--spin-us 0`, back to back: 1.7x faster at
8 MiB per request, 1.35x at 16 MiB, 1.1x at 64 MiB.

Why this shape (`pdserve bench transfer`, 2-core host, two Ray actors, 8 / 64 MiB requests): the
earlier design received each layer over ucxx tag messages into a ring of staging buffers and
scattered it with index_copy_. ucxx opens endpoints with error handling on, which leaves out
shared memory and cma, so those bytes crossed tcp loopback and were copied again: 0.8 / 1.7 GB/s.
RMA gets over cma straight from the prefill's tensors (the data path's endpoints have error
handling off): about 2 / 4 GB/s, bound by process_vm_readv into scattered 64 KiB pieces. Copying
out of the mapped staging ring: 3.5 / 6.2 GB/s. Copying out of the prefill's mapped KV cache,
which takes the staging copy away, with streaming stores: 5.2 / 10.7 GB/s. Tried and not kept:
having the progress thread send queued headers in batches (no better), and acking every header
at once (the sender's event loop then wakes per layer and takes the GIL from the thread
submitting the next one).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from services.proto_gen import kv_pb2
from services.transfer import native, ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.expected import ExpectedRequest
from services.transfer.fingerprint import KVFingerprint
from services.transfer.wire import decode_frame, encode_frame, new_frame_buffer, parse

log = logging.getLogger(__name__)

# Acks are what lets the sender reuse its memory, and nothing waits on them but the end of a
# request; so they are sent when a request completes, or once ACK_BATCH of them are due, or
# ACK_DELAY_S after the first one is due. Each ack wakes the sender's event loop, which on a
# busy host competes for the GIL with the thread that submits the next layer.
ACK_BATCH = 64
ACK_DELAY_S = 0.002


@dataclass
class _Shared:
    """A region of the sender's memory that this side reads: its staging ring or its KV cache."""

    key: native.RemoteKey
    address: int  # in the sender's address space
    length: int
    mapped: int  # where it is mapped here (0: not mapped, fetch by RMA get)

    def holds(self, address: int, length: int) -> bool:
        return self.address <= address and address + length <= self.address + self.length


class _Route(NamedTuple):
    """An expected request's route in the sink (see native.Sink)."""

    handle: int
    request: ExpectedRequest


@dataclass
class _Link:
    """One accepted connection: the ucxx control endpoint and the data-path connection back."""

    ep: Any
    task: asyncio.Task[Any] | None
    data: native.Connection | None = None
    tag: int = 0
    staging: _Shared | None = None  # the sender's staging ring, if it has one
    cache: _Shared | None = None  # the sender's shared KV cache, if it has one
    acks: list[int] = field(default_factory=list)  # due, not yet sent
    ack_timer: asyncio.TimerHandle | None = None
    ended: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class KVReceiver:
    """Receives KV for requests announced with `expect()` and signals them through `wait()`."""

    def __init__(self, kv_cache: torch.Tensor, fingerprint: KVFingerprint, config: TransferConfig) -> None:
        fp = fingerprint
        shape = (fp.num_layers, 2, kv_cache.shape[2] if kv_cache.dim() == 6 else -1, fp.block_size)
        expected_shape = (*shape, fp.num_kv_heads, fp.head_dim)
        if tuple(kv_cache.shape) != expected_shape or kv_cache.dtype != fp.torch_dtype:
            raise ValueError(
                f"kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} does not match the fingerprint: expected "
                f"[num_layers={fp.num_layers}, 2, num_blocks, block_size={fp.block_size}, "
                f"num_kv_heads={fp.num_kv_heads}, head_dim={fp.head_dim}] of {fp.torch_dtype}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")
        self._fp = fp
        self._config = config
        self._kv_cache = kv_cache
        self._cache_address = kv_cache.data_ptr()
        self._on_cuda = kv_cache.is_cuda
        self._num_blocks = int(kv_cache.shape[2])
        self._token_bytes = fp.payload_bytes(1) // 2  # K (or V) of one token of one layer
        self._plane_bytes = self._num_blocks * fp.block_size * self._token_bytes  # [layer, k/v] plane
        self._expected: dict[str, ExpectedRequest] = {}
        self._partial: set[ExpectedRequest] = set()  # requests with some of their KV, waiting for the rest
        self._bounce = torch.empty(0, dtype=torch.uint8)  # see _fetch: rings on another host
        self._sink: native.Sink | None = None  # routes straight into kv_cache (host memory only)
        self._routes: dict[int, _Route] = {}  # by key
        self._route_keys = itertools.count(1)
        self._conns: dict[int, _Link] = {}
        self._conn_ids = itertools.count()
        self._listener: Any = None
        self._ucxx: Any = None
        self._address: str | None = None
        self._closed = False

    # ---- public API -------------------------------------------------------------------------

    async def start(self) -> str:
        """Start the UCX listener; returns the "host:port" that senders connect to."""
        if self._closed:
            raise RuntimeError("KVReceiver is closed")
        if self._address is not None:
            return self._address
        self._ucxx = ucx_runtime.acquire(self._config)
        try:
            self._listener = self._ucxx.create_listener(
                self._serve, port=self._config.port, connect_timeout=self._config.timeout_s
            )
        except Exception:
            ucx_runtime.release()
            self._ucxx = None
            raise
        if not self._on_cuda:
            fp = self._fp
            self._sink = ucx_runtime.node().sink(
                self._cache_address, fp.num_layers, self._plane_bytes, self._token_bytes, fp.block_size
            )
        self._address = f"{self._config.host}:{self._listener.port}"
        return self._address

    def expect(self, request_id: str, block_ids: list[int], token_start: int, token_end: int) -> None:
        """Announce that KV for tokens [token_start, token_end) of every layer will arrive into block_ids."""
        if self._closed:
            raise RuntimeError("KVReceiver is closed")
        if request_id in self._expected:
            raise ValueError(f"request {request_id!r} is already expected")
        exp = ExpectedRequest(
            request_id, block_ids, token_start, token_end, self._fp.block_size, self._fp.num_layers, self._num_blocks
        )
        exp.pieces(0, exp.num_tokens, self._token_bytes)  # worked out now, not when the first layer lands
        if self._sink is not None:
            key = next(self._route_keys)
            self._routes[key] = _Route(self._sink.route(key, request_id.encode(), token_start, exp.slots), exp)
            exp.route = key
        self._expected[request_id] = exp

    async def wait(self, request_id: str, timeout: float | None = None) -> float:
        """Once every layer of the expected range has been written, the monotonic time it was; else TransferError.

        `timeout` defaults to the config's timeout_s. The request is forgotten afterwards either way,
        so headers that still arrive for it are acknowledged and dropped.
        """
        exp = self._expected.get(request_id)
        if exp is None:
            raise KeyError(f"request {request_id!r} is not expected (never announced, or already waited for)")
        limit = self._config.timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(exp.future), limit)
        except TimeoutError:
            self._fail(exp, TransferError("timeout", f"request {request_id!r}: KV did not arrive within {limit}s"))
            return exp.future.result()  # it completed just in time, or this raises its error
        finally:
            self._unroute(exp)
            if self._expected.get(request_id) is exp:
                del self._expected[request_id]

    def cancel(self, request_id: str) -> None:
        """Forget the request; its waiter gets TransferError("cancelled"), later headers are dropped."""
        exp = self._expected.pop(request_id, None)
        if exp is not None:
            self._fail(exp, TransferError("cancelled", f"request {request_id!r} was cancelled"))

    def pending(self) -> list[str]:
        """Ids of expected requests whose KV has not fully arrived (and that have not failed)."""
        return [rid for rid, exp in self._expected.items() if not exp.done]

    @property
    def num_connections(self) -> int:
        return len(self._conns)

    async def close(self) -> None:
        """Stop listening, drop every connection and fail every outstanding request with "cancelled"."""
        if self._closed:
            return
        self._closed = True
        for rid in list(self._expected):
            self.cancel(rid)
        links = list(self._conns.values())
        for link in links:
            self._end(link)
        tasks = [link.task for link in links if link.task is not None and link.task is not asyncio.current_task()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._conns.clear()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._listener is not None:
            await asyncio.sleep(0)  # let ucxx retire its handler bookkeeping first
            self._listener.close()
            self._listener = None
        if self._ucxx is not None:
            self._ucxx = None
            ucx_runtime.release()

    # ---- one connection ---------------------------------------------------------------------

    async def _serve(self, ep: Any) -> None:
        if self._closed:
            ep.abort()
            return
        from services.transfer.ucx_ops import post_recv

        conn = next(self._conn_ids)
        link = self._conns[conn] = _Link(ep, asyncio.current_task())
        watch = None
        try:
            if await self._handshake(conn, link):
                # Nothing more comes on the control endpoint: this receive ends when it does.
                watch = asyncio.ensure_future(post_recv(ep, new_frame_buffer()))
                watch.add_done_callback(lambda f: f.cancelled() or f.exception())
                await asyncio.wait([watch, link.ended], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not self._closed:
                raise
        except Exception as exc:  # UCX errors: the peer went away or the endpoint failed
            log.debug("KV connection %d ended: %r", conn, exc)
        finally:
            self._conns.pop(conn, None)
            self._end(link)
            self._fail_sourced(conn, link.tag, TransferError("peer_gone", f"KV sender connection {conn} closed"))
            if watch is not None:  # the abort ends it; let that happen while the loop still runs
                await asyncio.wait([watch], timeout=1.0)

    async def _handshake(self, conn: int, link: _Link) -> bool:
        """Check the sender's fingerprint and connect back to its worker; True when the link is up."""
        from services.transfer.ucx_ops import post_recv, post_send

        frame = new_frame_buffer()
        await asyncio.wait_for(post_recv(link.ep, frame), self._config.timeout_s)
        try:
            hello = decode_frame(frame, kv_pb2.HandshakeRequest)
            self._fp.check(KVFingerprint.from_proto(hello.fingerprint))
            node = ucx_runtime.node()
            link.tag = ucx_runtime.subscribe(lambda events: self._on_events(conn, events))
            link.data = node.connect(hello.worker_address, hello.tag, link.tag)
            if hello.HasField("staging"):
                link.staging = self._share(conn, link.data, hello.staging, "staging ring")
            if hello.HasField("cache"):
                link.cache = self._share(conn, link.data, hello.cache, "KV cache", prefault=True)
                if link.cache is not None and link.cache.mapped and self._sink is not None:
                    self._add_source(conn, link, link.cache)
            reply = kv_pb2.HandshakeReply(
                ok=True,
                worker_address=node.address,
                tag=link.tag,
                staging=link.staging is not None,
                cache=link.cache is not None,
            )
        except (KVIncompatible, ValueError, native.NativeError) as exc:
            reply = kv_pb2.HandshakeReply(ok=False, error=str(exc))
        await asyncio.wait_for(post_send(link.ep, encode_frame(reply)), self._config.timeout_s)
        if not reply.ok:
            # Leave the sender time to read the refusal before the endpoint goes away.
            await asyncio.sleep(0.05)
        return bool(reply.ok)

    @staticmethod
    def _share(conn: int, data: native.Connection, region: Any, what: str, prefault: bool = False) -> _Shared | None:
        """Unpack a shared region of the sender's (mapping it when on this host); None if unreachable.

        The first touch of each page of a mapping costs a fault: about 2 ms per 8 MiB here, which
        requests read from random blocks of the sender's KV cache would pay for a long while.
        `prefault` maps all of it now instead (about 80 ms per 512 MiB). The staging ring needs
        none of that: it is reused from its start, so its first pages are warm after one request.
        """
        try:
            key = data.unpack(region.rkey)
        except native.NativeError as exc:
            log.warning("KV connection %d: cannot reach the sender's %s (%s)", conn, what, exc)
            return None
        shared = _Shared(key, region.address, region.bytes, key.local_address(region.address))
        if shared.mapped and prefault:
            try:
                native.prefault(shared.mapped, shared.length)
            except OSError as exc:  # only slower: pages then map on first touch
                log.warning("KV connection %d: %s", conn, exc)
        return shared

    def _add_source(self, conn: int, link: _Link, cache: _Shared) -> None:
        """Let the data path place this connection's headers from `cache` itself (only faster)."""
        assert self._sink is not None
        try:
            self._sink.source(link.tag, cache.address, cache.length, cache.mapped)
        except OSError as exc:
            log.warning("KV connection %d: its headers go through Python (%s)", conn, exc)

    def _end(self, link: _Link) -> None:
        """Say goodbye on the data path, then close both endpoints (its _serve task then finishes)."""
        if not link.ended.done():
            link.ended.set_result(None)
        if link.tag and self._sink is not None:  # before its cache is unmapped
            link.acks.extend(self._sink.take_acks(link.tag))
            self._sink.unsource(link.tag)
        if link.tag:
            ucx_runtime.unsubscribe(link.tag)
        for shared in (link.staging, link.cache):
            if shared is not None:
                shared.key.close()
        link.staging = link.cache = None
        if link.data is not None:
            self._send_acks(-1, link, closing=True)
            link.data.close(flush_timeout_s=0.1)
        link.ep.abort()

    def _drop(self, conn: int, error: TransferError) -> None:
        link = self._conns.get(conn)
        log.warning("dropping KV connection %d: %s", conn, error)
        if link is not None:
            self._end(link)
        self._fail_sourced(conn, link.tag if link is not None else 0, error)

    # ---- headers ----------------------------------------------------------------------------

    def _on_events(self, conn: int, events: list[tuple[int, int, bytes]]) -> bool:
        """Every header that arrived on one connection since the last wake-up; True while more are due."""
        link = self._conns.get(conn)
        if link is None or link.data is None or link.ended.done():
            return False
        completed = acks_due = False
        for kind, status, payload in events:
            if kind == native.EVENT_ROUTE_DONE:
                self._route_done(payload)
                completed = True
                continue
            if kind == native.EVENT_ACKS_DUE:
                acks_due = True
                continue
            if kind == native.EVENT_PEER_FAILED:
                self._drop(
                    conn, TransferError("peer_gone", f"KV sender connection {conn}: {native.status_string(status)}")
                )
                return False
            try:
                hdr = parse(payload, kv_pb2.KVHeader)
            except ValueError as exc:
                self._drop(conn, TransferError("bad_header", f"malformed KV header: {exc}"))
                return False
            exp = self._expected.get(hdr.request_id)
            problem = self._check(hdr, link)
            if problem:
                if exp is not None:
                    self._fail(exp, TransferError("bad_header", problem))
                self._drop(conn, TransferError("bad_header", problem))
                return False
            try:
                completed = self._fetch(conn, link, hdr, exp) or completed
            except native.NativeError as exc:
                message = f"fetching KV of {hdr.request_id!r}: {exc}"
                timed_out = exc.status == native.UCS_ERR_TIMED_OUT
                self._drop(
                    conn, TransferError("timeout", message) if timed_out else TransferError("peer_gone", message)
                )
                return False
            link.acks.append(hdr.sequence)
        if (completed or acks_due) and self._sink is not None:
            link.acks.extend(self._sink.take_acks(link.tag))
        if completed or acks_due or len(link.acks) >= ACK_BATCH:
            self._send_acks(conn, link)
        elif link.acks and link.ack_timer is None:
            link.ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._send_acks, conn, link)
        return self._arriving()

    def _route_done(self, payload: bytes) -> None:
        """A route's request has all of its KV in place (the event says since when)."""
        key, at = native.ROUTE_DONE.unpack(payload)
        route = self._routes.get(key)
        if route is not None:
            route.request.complete(at)
            self._partial.discard(route.request)

    def _arriving(self) -> bool:
        """Whether some request has part of its KV and waits for the rest (more headers are due)."""
        self._partial = {exp for exp in self._partial if not exp.done}
        return bool(self._partial)

    def _send_acks(self, conn: int, link: _Link, closing: bool = False) -> None:
        if link.ack_timer is not None:
            link.ack_timer.cancel()
            link.ack_timer = None
        if not (link.acks or closing) or link.data is None:
            return
        ack = kv_pb2.KVAck(sequences=link.acks, closing=closing)
        link.acks = []
        try:
            link.data.send(ack.SerializeToString())
        except native.NativeError as exc:
            if not closing:
                self._drop(conn, TransferError("peer_gone", f"acknowledging on KV connection {conn}: {exc}"))

    def _check(self, hdr: Any, link: _Link) -> str:
        """Why a header cannot be trusted, or ""."""
        fp = self._fp
        if hdr.layer >= fp.num_layers:
            return f"header layer {hdr.layer} out of range (num_layers={fp.num_layers})"
        if hdr.num_tokens == 0:
            return "header with num_tokens=0"
        half = hdr.num_tokens * self._token_bytes
        if hdr.payload_bytes != 2 * half:
            return (
                f"header payload_bytes={hdr.payload_bytes} but {hdr.num_tokens} tokens of this layout take "
                f"{2 * half} bytes"
            )
        if bool(hdr.k_rkey) != bool(hdr.v_rkey) or not hdr.k_address or not hdr.v_address:
            return "header without the addresses of its K and V, or with only one key"
        if hdr.source_blocks:  # in the shared KV cache: every block named must lie inside it
            blocks = hdr.source_blocks
            if hdr.k_rkey or len(blocks) * fp.block_size < hdr.source_offset + hdr.num_tokens:
                return "header with cache blocks that do not hold its tokens, or with keys as well"
            plane = (max(blocks) + 1) * fp.block_size * self._token_bytes
            cache = link.cache
            if cache is None or not (cache.holds(hdr.k_address, plane) and cache.holds(hdr.v_address, plane)):
                return "header points outside the sender's shared KV cache"
        elif not hdr.k_rkey:  # in the staging ring: it must lie inside it
            staging = link.staging
            if staging is None or not staging.holds(hdr.k_address, 2 * half) or hdr.v_address != hdr.k_address + half:
                return "header points outside the sender's staging ring"
        return ""

    def _fetch(self, conn: int, link: _Link, hdr: Any, exp: ExpectedRequest | None) -> bool:
        """Copy the header's K and V into place; True when that completed its request."""
        if exp is None or exp.done or self._expected.get(exp.request_id) is not exp:
            return False  # unknown, cancelled, failed or timed-out request: nothing to fetch
        exp.sources.add(conn)
        rng = exp.local_range(hdr.token_start, hdr.num_tokens)
        if rng is None:
            self._fail(
                exp,
                TransferError(
                    "bad_header",
                    f"request {hdr.request_id!r}: tokens [{hdr.token_start}, {hdr.token_start + hdr.num_tokens})"
                    f" fall outside the expected [{exp.token_start}, {exp.token_end})",
                ),
            )
            return False
        if hdr.source_blocks:
            shared = link.cache
            pieces = exp.pieces(*rng, self._token_bytes, tuple(hdr.source_blocks), hdr.source_offset)
        else:
            shared = link.staging
            pieces = exp.pieces(*rng, self._token_bytes)
        k_plane = self._cache_address + 2 * hdr.layer * self._plane_bytes
        v_plane = k_plane + self._plane_bytes
        timeout = self._config.timeout_s
        assert link.data is not None
        if hdr.k_rkey:  # registered in place
            for rkey, address, plane in ((hdr.k_rkey, hdr.k_address, k_plane), (hdr.v_rkey, hdr.v_address, v_plane)):
                key = link.data.unpack(rkey)
                try:
                    link.data.fetch(key, address, plane, pieces, timeout)
                finally:
                    key.close()
            return self._mark(hdr, exp, rng)
        assert shared is not None  # _check saw to it
        if shared.mapped and not self._on_cuda:
            mapped = shared.mapped - shared.address
            native.copy_kv(mapped + hdr.k_address, mapped + hdr.v_address, k_plane, v_plane, pieces)
        elif self._on_cuda or hdr.source_blocks:  # RMA gets straight into place (UCX copies host to device)
            link.data.fetch(shared.key, hdr.k_address, k_plane, pieces, timeout)
            link.data.fetch(shared.key, hdr.v_address, v_plane, pieces, timeout)
        else:  # a ring this process cannot map: one get of K and V into a bounce buffer, then copies
            half = int(hdr.payload_bytes) // 2
            if self._bounce.numel() < 2 * half:
                self._bounce = torch.empty(2 * half, dtype=torch.uint8)
            bounce = self._bounce.data_ptr()
            whole = native.Pieces(np.array([[0], [0], [2 * half]]))
            link.data.fetch(shared.key, hdr.k_address, bounce, whole, timeout)
            native.copy_kv(bounce, bounce + half, k_plane, v_plane, pieces)
        return self._mark(hdr, exp, rng)

    def _mark(self, hdr: Any, exp: ExpectedRequest, rng: tuple[int, int]) -> bool:
        if self._on_cuda:
            torch.cuda.synchronize(self._kv_cache.device)
        if exp.route and self._sink is not None:  # its route keeps what has arrived
            if self._sink.mark(self._routes[exp.route].handle, hdr.layer, *rng):
                exp.complete(time.monotonic())
        else:
            exp.mark(hdr.layer, *rng)
        if exp.done:
            self._partial.discard(exp)
            return True
        self._partial.add(exp)
        return False

    def _fail_sourced(self, conn: int, tag: int, error: TransferError) -> None:
        """Fail the requests that connection `conn` (its tag: `tag`) delivered KV for."""
        sink = self._sink
        for exp in list(self._expected.values()):
            routed_from = sink.route_source(self._routes[exp.route].handle) if exp.route and sink is not None else 0
            if conn in exp.sources or (tag and routed_from == tag):
                self._fail(exp, error)

    def _fail(self, exp: ExpectedRequest, error: TransferError) -> None:
        self._unroute(exp)
        exp.fail(error)

    def _unroute(self, exp: ExpectedRequest) -> None:
        """Remove the request's route: once this returns, nothing more is written for it."""
        route = self._routes.pop(exp.route, None)
        if route is not None and self._sink is not None:
            self._sink.unroute(route.handle)
        exp.route = 0
