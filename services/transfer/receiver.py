"""Decode side of the KV hand-off: accepts prefill connections and writes their KV into `kv_cache`.

Each connection keeps a ring of receives posted ahead (see inbound.py). A message (header, K, V;
see wire.py) lands in a ring buffer and is scattered into the request's slots with `index_copy_`,
synchronously on the event loop, before the buffer is re-posted: a request cancelled while its
payload is in flight is therefore never written into blocks that may already belong to someone
else, and payloads of unknown or forgotten requests are dropped.

Why this shape (measured with `pdserve bench transfer` and a two-process loop on the 2-core dev
box, see the transfer report): with ucxx's "thread" progress mode, each time Python must act on a
UCX completion costs a wake-up chain (progress thread → notifier thread → event loop) of a few
hundred µs. The previous design received a header, then posted K and V, then awaited them before
the next header: two serial wake-ups per layer, ~64 per 32-layer request. Now nothing on the wire
waits for Python; the loop wakes once per burst and handles every message that landed. Per
request, two runs: 8 MiB 0.23-0.25 → 0.66-0.69 GB/s, 64 MiB 1.03-1.27 → 1.81-1.87 GB/s.

Evaluated and not kept: one-sided RMA (ucxx 0.52's Python API has no memory registration, rkeys
or put: endpoints offer tag, stream and active messages only); spinning progress ("thread-polling"
was 2x slower here: the spinning threads starve the rest on 2 cores); rndv get_zcopy (slower);
UCX_TLS without posix, or tcp only (no better). What remains is UCX itself under blocking progress:
raw ucxx with every receive pre-posted and no Python work per message moves 8 MiB (32 messages)
in ~4-6 ms and 64 MiB in ~21 ms here, while ucx_perftest busy-polls; that bounds this path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import numpy as np
import torch

from services.proto_gen import kv_pb2
from services.transfer import ucx_runtime
from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.expected import ExpectedRequest
from services.transfer.fingerprint import KVFingerprint
from services.transfer.inbound import InboundConnection
from services.transfer.wire import (
    FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    decode_frame,
    encode_frame,
    frame_length,
    new_frame_buffer,
    raw_follows,
)

log = logging.getLogger(__name__)


class _DropConnection(Exception):
    """The stream from this peer can no longer be trusted; close it."""


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
        self._num_blocks = int(kv_cache.shape[2])
        num_slots = self._num_blocks * fp.block_size
        # [layer, k/v, slot, head, dim]: index_copy_ along dim 0 of flat[layer, kv] scatters tokens.
        self._flat = kv_cache.view(fp.num_layers, 2, num_slots, fp.num_kv_heads, fp.head_dim)
        self._device = kv_cache.device
        self._expected: dict[str, ExpectedRequest] = {}
        self._conns: dict[int, tuple[Any, asyncio.Task[Any] | None]] = {}
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
        self._address = f"{self._config.host}:{self._listener.port}"
        return self._address

    def expect(self, request_id: str, block_ids: list[int], token_start: int, token_end: int) -> None:
        """Announce that KV for tokens [token_start, token_end) of every layer will arrive into block_ids."""
        if self._closed:
            raise RuntimeError("KVReceiver is closed")
        if request_id in self._expected:
            raise ValueError(f"request {request_id!r} is already expected")
        self._expected[request_id] = ExpectedRequest(
            request_id,
            block_ids,
            token_start,
            token_end,
            self._fp.block_size,
            self._fp.num_layers,
            self._num_blocks,
            self._device,
        )

    async def wait(self, request_id: str, timeout: float | None = None) -> None:
        """Return once every layer of the expected range has been written; raise TransferError otherwise.

        `timeout` defaults to the config's timeout_s. The request is forgotten afterwards either way,
        so payloads that still arrive for it are drained and discarded.
        """
        exp = self._expected.get(request_id)
        if exp is None:
            raise KeyError(f"request {request_id!r} is not expected (never announced, or already waited for)")
        limit = self._config.timeout_s if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(exp.future), limit)
        except TimeoutError:
            exp.fail(TransferError("timeout", f"request {request_id!r}: KV did not arrive within {limit}s"))
            error = exp.future.exception()
            if error is not None:
                raise error from None
        finally:
            if self._expected.get(request_id) is exp:
                del self._expected[request_id]

    def cancel(self, request_id: str) -> None:
        """Forget the request; its waiter gets TransferError("cancelled"), late payloads are discarded."""
        exp = self._expected.pop(request_id, None)
        if exp is not None:
            exp.fail(TransferError("cancelled", f"request {request_id!r} was cancelled"))

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
        tasks = [t for _, t in self._conns.values() if t is not None and t is not asyncio.current_task()]
        for ep, task in list(self._conns.values()):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            ep.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._conns.clear()
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
        conn = next(self._conn_ids)
        self._conns[conn] = (ep, asyncio.current_task())
        try:
            inbound = await self._handshake(conn, ep)
            if inbound is not None:
                await inbound.ended
        except _DropConnection:
            pass
        except asyncio.CancelledError:
            if not self._closed:
                raise
        except Exception as exc:  # UCX errors: the peer went away or the endpoint failed
            log.debug("KV connection %d ended: %r", conn, exc)
        finally:
            self._conns.pop(conn, None)
            self._fail_sourced(conn, TransferError("peer_gone", f"KV sender connection {conn} closed"))
            ep.abort()

    async def _handshake(self, conn: int, ep: Any) -> InboundConnection | None:
        """Check the sender's fingerprint; on success post the receive ring, then say ok."""
        from services.transfer.ucx_ops import post_recv, post_send

        frame = new_frame_buffer()
        await asyncio.wait_for(post_recv(ep, frame), self._config.timeout_s)
        inbound = None
        try:
            self._fp.check(KVFingerprint.from_proto(decode_frame(frame, kv_pb2.KVFingerprint)))
            reply = kv_pb2.HandshakeReply(ok=True)
            inbound = InboundConnection(conn, ep, self._config.recv_depth, self._device, self._on_message)
            inbound.start()
        except (KVIncompatible, ValueError) as exc:
            reply = kv_pb2.HandshakeReply(ok=False, error=str(exc))
        await asyncio.wait_for(post_send(ep, encode_frame(reply)), self._config.timeout_s)
        if not reply.ok:
            # Leave the sender time to read the refusal before the endpoint goes away.
            await asyncio.sleep(0.05)
        return inbound

    def _on_message(self, inbound: InboundConnection, buf: torch.Tensor) -> None:
        """Handle every part of one received message; raises _DropConnection if the stream can't be trusted."""
        raw = inbound.raw_pending
        if raw:  # K (then V) of the flagged header before: the whole message is payload
            hdr, exp, which = raw.pop(0)
            self._on_raw(inbound.conn_id, hdr, exp, which, buf)
            return
        at = 0
        while at + FRAME_BYTES <= MAX_MESSAGE_BYTES:
            frame = buf[at : at + FRAME_BYTES]
            frame_np = (frame if frame.device.type == "cpu" else frame.cpu()).numpy()
            if at > 0 and frame_length(frame_np) == 0:
                return  # end mark
            hdr, exp, problem = self._parse_header(frame_np)
            if hdr is None or at + FRAME_BYTES + int(hdr.payload_bytes) > MAX_MESSAGE_BYTES:
                problem = problem or f"KV part at offset {at} runs past the {MAX_MESSAGE_BYTES}-byte message"
                if exp is not None:
                    exp.fail(TransferError("bad_header", problem))
                log.warning("dropping KV connection %d: %s", inbound.conn_id, problem)
                raise _DropConnection(problem)
            if raw_follows(frame_np):
                inbound.raw_pending[:] = [(hdr, exp, 0), (hdr, exp, 1)]
                return
            payload = at + FRAME_BYTES
            at = payload + int(hdr.payload_bytes)
            self._on_part(inbound.conn_id, hdr, exp, buf, payload)

    def _on_raw(self, conn: int, hdr: Any, exp: ExpectedRequest | None, which: int, buf: torch.Tensor) -> None:
        """K (which=0) or V (which=1) of a flagged header, alone in `buf`; V completes the part."""
        rng = self._usable_range(conn, hdr, exp)
        if exp is None or rng is None:
            return
        a, b = rng
        fp = self._fp
        shape = (b - a, fp.num_kv_heads, fp.head_dim)
        half = int(hdr.payload_bytes) // 2
        self._flat[hdr.layer, which].index_copy_(0, exp.slots[a:b], buf[:half].view(fp.torch_dtype).view(shape))
        if which == 1:
            exp.mark(hdr.layer, a, b)

    def _on_part(self, conn: int, hdr: Any, exp: ExpectedRequest | None, buf: torch.Tensor, payload: int) -> None:
        rng = self._usable_range(conn, hdr, exp)
        if exp is None or rng is None:
            return
        half = int(hdr.payload_bytes) // 2
        self._scatter(hdr.layer, exp, rng, buf[payload : payload + half], buf[payload + half : payload + 2 * half])
        exp.mark(hdr.layer, *rng)

    def _usable_range(self, conn: int, hdr: Any, exp: ExpectedRequest | None) -> tuple[int, int] | None:
        """Where a part's tokens go in its request, or None to drop it (and fail the request if it's wrong)."""
        if exp is None or exp.done or self._expected.get(exp.request_id) is not exp:
            return None  # unknown, cancelled, failed or timed-out request: drop the payload
        exp.sources.add(conn)
        rng = exp.local_range(hdr.token_start, hdr.num_tokens)
        if rng is None:
            exp.fail(
                TransferError(
                    "bad_header",
                    f"request {hdr.request_id!r}: tokens [{hdr.token_start}, {hdr.token_start + hdr.num_tokens})"
                    f" fall outside the expected [{exp.token_start}, {exp.token_end})",
                )
            )
        return rng

    def _parse_header(self, frame: np.ndarray) -> tuple[Any, ExpectedRequest | None, str]:
        """(header, its request or None, "") when usable; (None, request or None, problem) when malformed."""
        try:
            hdr = decode_frame(frame, kv_pb2.KVHeader)
        except ValueError as exc:
            return None, None, f"malformed KV header: {exc}"
        exp = self._expected.get(hdr.request_id)
        fp = self._fp
        if hdr.layer >= fp.num_layers:
            return None, exp, f"header layer {hdr.layer} out of range (num_layers={fp.num_layers})"
        if hdr.num_tokens == 0:
            return None, exp, "header with num_tokens=0"
        want = fp.payload_bytes(hdr.num_tokens)
        if hdr.payload_bytes != want:
            return None, exp, (
                f"header payload_bytes={hdr.payload_bytes} but {hdr.num_tokens} tokens of this layout "
                f"take {want} bytes"
            )
        return hdr, exp, ""

    def _scatter(
        self, layer: int, exp: ExpectedRequest, rng: tuple[int, int], k_buf: torch.Tensor, v_buf: torch.Tensor
    ) -> None:
        a, b = rng
        fp = self._fp
        slots = exp.slots[a:b]
        shape = (b - a, fp.num_kv_heads, fp.head_dim)
        self._flat[layer, 0].index_copy_(0, slots, k_buf.view(fp.torch_dtype).view(shape))
        self._flat[layer, 1].index_copy_(0, slots, v_buf.view(fp.torch_dtype).view(shape))

    def _fail_sourced(self, conn: int, error: TransferError) -> None:
        for exp in self._expected.values():
            if conn in exp.sources:
                exp.fail(error)
