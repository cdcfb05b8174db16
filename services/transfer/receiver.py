"""Decode side of the KV hand-off: accepts prefill connections and copies their KV into `kv_cache`.

For each KVHeader a sender announces (see sender.py), the receiver checks it against the
request's expectation, copies K and V straight into the request's slots, one piece per run of
slots consecutive on both sides, and acknowledges, so the sender can let go of its memory. How the
bytes come depends on what the header names and whether this side can map it (recv_paths.py).
All of it happens synchronously on the event loop (ctypes drops the GIL while C copies), so once the
headers of one wake-up are handled their KV is in place (RMA gets of all of them are in flight
together, then waited for: `_settle`), and when a request is cancelled nothing is left in flight
that could still write into blocks that may already belong to someone else. Headers of unknown,
cancelled or failed requests are acknowledged without copying. On a host KV cache, headers from a
mapped shared cache for an expected request skip Python altogether (routes.py).

While a request's layers are arriving, the event loop does not go back to sleep between headers:
it polls the data-path worker for up to `spin_us` (ucx_runtime), so the next header lands without
a wake-up on either side. services/bench/README.md has the figures behind these choices.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import torch

from services.proto_gen import kv_pb2
from services.transfer import native, ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import TransferError
from services.transfer.expectations import Expectations
from services.transfer.expected import ExpectedRequest, KVArrival
from services.transfer.fingerprint import KVFingerprint
from services.transfer.handshake import load_token
from services.transfer.recv_links import Link, PostedRead
from services.transfer.recv_paths import MAX_HEADER_BYTES, BounceBuffer, header_problem
from services.transfer.routes import Routes
from services.transfer.wire import keep_alive, parse, until_closed

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"  # what a receiver advertises when its config names no host


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
        self._token = load_token(config)
        self._kv_cache = kv_cache
        self._cache_address = kv_cache.data_ptr()
        self._on_cuda = kv_cache.is_cuda
        self._num_blocks = int(kv_cache.shape[2])
        self._token_bytes = fp.payload_bytes(1) // 2  # K (or V) of one token of one layer
        self._plane_bytes = self._num_blocks * fp.block_size * self._token_bytes  # [layer, k/v] plane
        self._requests = Expectations(fp, self._num_blocks, self._token_bytes)
        self._bounce = BounceBuffer()  # for rings on another host
        self._routes: Routes | None = None  # straight into kv_cache (host memory only)
        self._links: dict[int, Link] = {}
        self._conn_ids = itertools.count()
        self._listener: asyncio.Server | None = None
        self._address: str | None = None
        self._closed = False

    # ---- public API -------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen for senders on the configured host (127.0.0.1 when none); returns the "host:port" they connect to."""
        if self._closed:
            raise RuntimeError("KVReceiver is closed")
        if self._address is not None:
            return self._address
        ucx_runtime.acquire(self._config)
        host = self._config.host or LOOPBACK
        try:
            self._listener = await asyncio.start_server(self._serve, host, self._config.port)
        except BaseException:
            ucx_runtime.release()
            raise
        if not self._on_cuda:
            fp = self._fp
            sink = ucx_runtime.node().sink(
                self._cache_address, fp.num_layers, self._plane_bytes, self._token_bytes, fp.block_size
            )
            self._routes = self._requests.routes = Routes(sink)
        port = self._listener.sockets[0].getsockname()[1]
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self._address

    def expect(self, request_id: str, block_ids: list[int], token_start: int, token_end: int) -> None:
        """Announce that KV for tokens [token_start, token_end) of every layer will arrive into block_ids."""
        if self._closed:
            raise RuntimeError("KVReceiver is closed")
        self._requests.add(request_id, block_ids, token_start, token_end)

    async def wait(self, request_id: str, timeout: float | None = None) -> KVArrival:
        """Once every layer of the expected range has been written, when that was and over what; else TransferError.

        `timeout` defaults to the config's timeout_s. The request is forgotten afterwards either way,
        so headers that still arrive for it are acknowledged and dropped.
        """
        return await self._requests.wait(request_id, self._config.timeout_s if timeout is None else timeout)

    def cancel(self, request_id: str) -> None:
        """Forget the request; its waiter gets TransferError("cancelled"), later headers are dropped."""
        self._requests.cancel(request_id)

    def pending(self) -> list[str]:
        """Ids of expected requests whose KV has not fully arrived (and that have not failed)."""
        return self._requests.pending()

    @property
    def num_connections(self) -> int:
        return len(self._links)

    async def close(self) -> None:
        """Stop listening, drop every connection and fail every outstanding request with "cancelled"."""
        if self._closed:
            return
        self._closed = True
        for rid in self._requests.ids():
            self.cancel(rid)
        links = list(self._links.values())
        for link in links:
            link.end(self._routes)
        tasks = [link.task for link in links if link.task is not None and link.task is not asyncio.current_task()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._links.clear()
        if self._routes is not None:
            self._routes.close()
            self._routes = self._requests.routes = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            ucx_runtime.release()

    # ---- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()
            return
        keep_alive(writer)
        conn = next(self._conn_ids)
        link = self._links[conn] = Link(conn, reader, writer, self._drop)
        watch = None
        try:
            accepted = await link.accept(
                self._fp, self._config, self._on_events, self._on_cuda, self._bounce, self._routes, self._token
            )
            if accepted:
                # Nothing more comes on the control connection: this read ends when it does.
                watch = asyncio.ensure_future(until_closed(reader))
                ends: list[asyncio.Future[Any]] = [watch, link.ended]
                await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not self._closed:
                raise
        except Exception as exc:  # the peer went away, broke the protocol, or timed out
            log.debug("KV connection %d ended: %r", conn, exc)
        finally:
            self._links.pop(conn, None)
            link.end(self._routes)
            self._requests.fail_sourced(
                conn, link.tag, TransferError("peer_gone", f"KV sender connection {conn} closed")
            )
            if watch is not None:  # the abort ends it; let that happen while the loop still runs
                await asyncio.wait([watch], timeout=1.0)

    def _drop(self, conn: int, error: TransferError) -> None:
        link = self._links.get(conn)
        log.warning("dropping KV connection %d: %s", conn, error)
        if link is not None:
            link.end(self._routes)
        self._requests.fail_sourced(conn, link.tag if link is not None else 0, error)

    # ---- headers ----------------------------------------------------------------------------

    def _on_events(self, conn: int, events: list[tuple[int, int, bytes]]) -> bool:
        """Every header that arrived on one connection since the last wake-up; True while more are due."""
        link = self._links.get(conn)
        if link is None or link.data is None or link.ended.done():
            return False
        completed = acks_due = False
        try:
            for kind, status, payload in events:
                if kind == native.EVENT_ROUTE_DONE:
                    self._requests.route_done(payload)
                    completed = True
                elif kind == native.EVENT_ACKS_DUE:
                    acks_due = True
                elif kind == native.EVENT_PEER_FAILED:
                    message = f"KV sender connection {conn}: {native.status_string(status)}"
                    self._drop(conn, TransferError("peer_gone", message))
                    return False
                else:
                    handled = self._on_header(link, payload)
                    if handled is None:
                        return False
                    completed = handled or completed
        finally:
            settled = self._settle(link)  # whatever happened, no get posted above is left in flight
        if settled is None:
            return False
        completed = settled or completed
        if (completed or acks_due) and self._routes is not None:
            link.acks.extend(self._routes.take_acks(link.tag))
        link.acks_due(now=completed or acks_due)
        return self._requests.arriving()

    def _on_header(self, link: Link, payload: bytes) -> bool | None:
        """Check and place one header; whether that completed its request (None: the connection was dropped)."""
        try:
            if len(payload) > MAX_HEADER_BYTES:
                raise ValueError(f"{len(payload)} bytes, more than {MAX_HEADER_BYTES}")
            hdr = parse(payload, kv_pb2.KVHeader)
        except ValueError as exc:
            self._drop(link.conn, TransferError("bad_header", f"malformed KV header: {exc}"))
            return None
        exp = self._requests.by_id.get(hdr.request_id)
        problem = header_problem(hdr, self._fp, self._token_bytes, link.cache, link.ring)
        if problem:
            if exp is not None:
                self._requests.fail(exp, TransferError("bad_header", problem))
            self._drop(link.conn, TransferError("bad_header", problem))
            return None
        try:
            return self._fetch(link, hdr, exp)
        except native.NativeError as exc:
            self._fetch_failed(link, hdr.request_id, exc)
            return None

    def _fetch(self, link: Link, hdr: Any, exp: ExpectedRequest | None) -> bool:
        """Copy the header's K and V into place; True when that completed its request.

        The header's ack falls due once its KV is in place: now, or, for gets that were only posted,
        in `_settle`.
        """
        if exp is None or exp.done or self._requests.by_id.get(exp.request_id) is not exp:
            link.acks.append(hdr.sequence)
            return False  # unknown, cancelled, failed or timed-out request: nothing to fetch
        exp.sources.add(link.conn)
        rng = exp.local_range(hdr.token_start, hdr.num_tokens)
        if rng is None:
            outside = f"tokens [{hdr.token_start}, {hdr.token_start + hdr.num_tokens})"
            expected = f"the expected [{exp.token_start}, {exp.token_end})"
            message = f"request {hdr.request_id!r}: {outside} fall outside {expected}"
            self._requests.fail(exp, TransferError("bad_header", message))
            link.acks.append(hdr.sequence)
            return False
        if hdr.source_blocks:
            pieces = exp.pieces(*rng, self._token_bytes, tuple(hdr.source_blocks), hdr.source_offset)
        else:
            pieces = exp.pieces(*rng, self._token_bytes)
        k_plane = self._cache_address + 2 * hdr.layer * self._plane_bytes
        path = link.cache if hdr.source_blocks else link.in_place if hdr.k_rkey else link.ring
        assert path is not None  # header_problem saw to it
        path.read(hdr, pieces, k_plane, k_plane + self._plane_bytes)
        exp.transports.add(path.transport)
        if path.posts:
            link.posted.append(PostedRead(exp, hdr.layer, *rng, hdr.sequence))
            return False
        if self._on_cuda:
            torch.cuda.synchronize(self._kv_cache.device)
        link.acks.append(hdr.sequence)
        return self._requests.mark(exp, hdr.layer, *rng)

    def _settle(self, link: Link) -> bool | None:
        """Wait for the gets posted on the connection, then record what they brought; True when that completed a
        request (None: the connection was dropped)."""
        posted, link.posted = link.posted, []
        if not posted or link.data is None:
            return False
        try:
            link.data.wait(self._config.timeout_s)
        except native.NativeError as exc:
            self._fetch_failed(link, posted[0].request.request_id, exc)
            return None
        if self._on_cuda:
            torch.cuda.synchronize(self._kv_cache.device)
        completed = False
        for read in posted:
            link.acks.append(read.sequence)
            exp = read.request
            if not exp.done and self._requests.by_id.get(exp.request_id) is exp:  # not failed meanwhile
                completed = self._requests.mark(exp, read.layer, read.a, read.b) or completed
        return completed

    def _fetch_failed(self, link: Link, request_id: str, exc: native.NativeError) -> None:
        message = f"fetching KV of {request_id!r}: {exc}"
        timed_out = exc.status == native.UCS_ERR_TIMED_OUT
        self._drop(link.conn, TransferError("timeout", message) if timed_out else TransferError("peer_gone", message))
