"""A decode worker's tokens to the router over a TCP connection of their own, not a Ray streaming call.

A Ray streaming generator costs each token batch a report from the worker's core worker to the router's and an
object fetch back: about 2-3 ms between an engine step's end and the router, and CPU on the decode worker's
core, which its engine thread then waits for. Here each generate call is one connection:

    router                                              decode worker (TokenServer)
    connect to WorkerInfo.token_address
    HELLO + WorkerInfo.token_secret        ─────────►   checked before anything is parsed; else closed
    frame(generate's arguments)            ─────────►   DecodeWorker.generate(*arguments, send=...)
                                           ◄─────────   frame(("batch", TokenBatch)) per batch, the last finished
                                           ◄─────────   or frame(("error", kind, message)), then closed
    close (done, aborted, cancelled)       ─────────►   the generate call is cancelled: the engine aborts it

generate hands each batch to `send`, which frames it and sends it at once from the thread that calls it: the
engine's own, right after the step that made the batch (FrameWriter). The worker's event loop then takes no
part in a token's way out; it had to be scheduled first, and on a few cores it waited for the engine's threads
(services/bench/README.md).

The address and the secret come with WorkerInfo over Ray, which only the cluster's members reach, so a frame is
unpickled only once its peer has shown the secret: a peer that has not is dropped with a log line, as is one
that sends a malformed frame. A connection that ends before the finished batch means the worker is gone (or
failed): TokenStreamLost, which the router treats as a worker death (migration.py). TCP keepalive ends a
connection to a host that went silent.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pickle
import secrets
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.transfer.errors import TransferError
from services.transfer.wire import keep_alive
from services.worker.messages import TokenBatch

HELLO = b"pdserve-tokens/1\n"
SECRET_BYTES = 32
_LEN = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 28  # a batch may carry a long prompt's logprobs
HELLO_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)
SendBatch = Callable[[TokenBatch], None]
# DecodeWorker.generate: generate(*arguments, send=...) hands every batch of the call to `send` and returns after
# the finished one.
Generate = Callable[..., Awaitable[None]]


class TokenStreamLost(ConnectionError):
    """The connection to a decode worker ended before the request's finished batch: the worker is gone."""


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; ValueError for a malformed one, IncompleteReadError when the stream ends."""
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {length} bytes is more than the {MAX_FRAME_BYTES} allowed")
    try:
        return pickle.loads(await reader.readexactly(length))
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
        raise ValueError(f"a malformed frame: {exc}") from None


def _error(exc: BaseException) -> tuple[str, str, str]:
    """How a failed generate call reaches the router: a kind it raises again, and the message."""
    if isinstance(exc, TransferError):
        return ("error", "transfer", f"{exc.reason}\n{exc.message}")
    kind = "invalid" if isinstance(exc, InvalidRequest) else "exhausted" if isinstance(exc, ResourceExhausted) \
        else "failed"
    return ("error", kind, str(exc) or type(exc).__name__)


def _raise(kind: str, message: str) -> None:
    if kind == "transfer":
        reason, _, text = message.partition("\n")
        raise TransferError(reason, text)  # type: ignore[arg-type]
    if kind == "invalid":
        raise InvalidRequest(message)
    if kind == "exhausted":
        raise ResourceExhausted(message)
    raise WorkerStreamFailed(message)


class WorkerStreamFailed(RuntimeError):
    """The decode worker's generate call raised something other than a request's own errors."""


class FrameWriter:
    """One connection's frames to the router, from any thread: each frame goes out whole and in order, at once from
    the thread that sends it while the socket takes it. What the socket does not take waits in a backlog, which
    the event loop sends when the socket can take more (and nothing jumps it meanwhile).

    The connection's asyncio transport keeps the socket for reading (to see the router close it); frames leave
    through a second descriptor of the socket, which the transport does not own. The backlog is not bounded: it
    holds at most one request's batches, which the router reads as they come.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._backlog = bytearray()
        self._closed = False  # closed here, or the socket failed: frames are dropped
        self._drained = asyncio.Event()

    def send(self, obj: Any) -> None:
        """Frames `obj` and sends it, from any thread."""
        data = frame(obj)
        with self._lock:
            if self._closed:
                return
            if self._backlog:  # the loop is sending the backlog: this frame waits behind it
                self._backlog += data
                return
            data = data[self._send(data):]
            if data:
                self._backlog += data
                self._loop.call_soon_threadsafe(self._flush_when_writable)

    def _send(self, data: bytes | memoryview) -> int:
        """How much of `data` the socket took (under the lock); a failed socket closes the writer."""
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._closed = True
            return len(data)

    def _flush_when_writable(self) -> None:
        with self._lock:
            if self._backlog and not self._closed:
                self._loop.add_writer(self._sock.fileno(), self._flush)

    def _flush(self) -> None:
        with self._lock:
            with memoryview(self._backlog) as view:
                sent = self._send(view)
            del self._backlog[:sent]
            if self._backlog and not self._closed:
                return
            self._loop.remove_writer(self._sock.fileno())
            self._backlog.clear()
        self._drained.set()

    async def drain(self) -> None:
        """Returns once every frame sent so far has gone to the socket (or the socket failed)."""
        while True:
            with self._lock:
                if not self._backlog:
                    return
                self._drained.clear()
            await self._drained.wait()

    def close(self) -> None:
        """Drops what is still to send, and every later frame. On the loop's thread."""
        with self._lock:
            if self._backlog:
                self._loop.remove_writer(self._sock.fileno())
            self._closed = True
            self._backlog.clear()
            self._sock.close()
        self._drained.set()


class TokenServer:
    """Serves `generate` (DecodeWorker.generate) to routers that know the secret; see the module docstring."""

    def __init__(self, generate: Generate) -> None:
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self._generate = generate
        self._server: asyncio.Server | None = None
        self.address: str | None = None

    async def start(self, host: str) -> str:
        """Listens on `host` (the worker's advertised address); returns the "host:port" routers connect to."""
        if self.address is None:
            self._server = await asyncio.start_server(self._serve, host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            hello = await asyncio.wait_for(reader.readexactly(len(HELLO) + SECRET_BYTES), HELLO_TIMEOUT_S)
            if not hmac.compare_digest(hello, HELLO + self.secret):
                log.warning("token stream from %s refused: it did not show this worker's secret", peer)
                return
            arguments = await asyncio.wait_for(read_frame(reader), HELLO_TIMEOUT_S)
            if not isinstance(arguments, tuple):
                raise ValueError(f"generate's arguments must be a tuple, not {type(arguments).__name__}")
            keep_alive(writer)
            await self._stream(arguments, reader, writer)
        except (asyncio.IncompleteReadError, TimeoutError, ValueError, TypeError, ConnectionError) as exc:
            log.warning("token stream from %s refused: %s", peer, exc or type(exc).__name__)
        finally:
            writer.close()

    async def _stream(self, arguments: tuple[Any, ...], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Runs generate until it ends or the router closes the connection, whichever is first."""
        frames = FrameWriter(writer)
        call = asyncio.ensure_future(self._call(arguments, frames))
        gone = asyncio.ensure_future(reader.read(1))  # b"" (or an error) once the router closes
        try:
            await asyncio.wait((call, gone), return_when=asyncio.FIRST_COMPLETED)
            if call.done() and not gone.done():  # the last frames may still wait for the socket
                drained = asyncio.ensure_future(frames.drain())
                await asyncio.wait((drained, gone), return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
        finally:
            gone.cancel()
            if not call.done():
                call.cancel()  # a router gone mid-call: the call ends now (the engine aborts it)
            await asyncio.gather(call, gone, return_exceptions=True)
            frames.close()

    async def _call(self, arguments: tuple[Any, ...], frames: FrameWriter) -> None:
        try:
            await self._generate(*arguments, send=lambda batch: frames.send(("batch", batch)))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the router raises it again
            frames.send(_error(exc))


class TokenStream:
    """The router's end of one generate call (see the module docstring): iterate for its batches, then close
    (or use it as an async context manager)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, address: str, secret: bytes, arguments: tuple[Any, ...]) -> TokenStream:
        """Starts generate(*arguments) on the decode worker at `address`; TokenStreamLost when it cannot be reached."""
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError as exc:
            raise TokenStreamLost(f"cannot reach the decode worker's token stream at {address}: {exc}") from None
        keep_alive(writer)
        writer.write(HELLO + secret + frame(arguments))
        return cls(reader, writer)

    async def __aiter__(self) -> AsyncIterator[TokenBatch]:
        """The batches until the finished one; the call's errors raised again here, TokenStreamLost when the
        connection ends first."""
        while True:
            try:
                message = await read_frame(self._reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise TokenStreamLost(f"the decode worker's token stream ended: {exc}") from None
            if message[0] == "error":
                _raise(message[1], message[2])
            batch: TokenBatch = message[1]
            yield batch
            if batch.finished:
                return

    def close(self) -> None:
        """Ends the connection, and with it the call on the worker if it still runs."""
        self._writer.close()

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
