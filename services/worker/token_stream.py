"""A decode worker's tokens to the router over a TCP connection of their own, not a Ray streaming call.

A Ray streaming generator costs each token batch a report from the worker's core worker to the router's and an
object fetch back: about 2-3 ms between an engine step's end and the router, and CPU on the decode worker's
core, which its engine thread then waits for. Here each generate call is one connection:

    router                                              decode worker (TokenServer)
    connect to WorkerInfo.token_address
    HELLO + WorkerInfo.token_secret        ─────────►   checked before anything is parsed; else closed
    frame(generate's arguments)            ─────────►   DecodeWorker.generate(*arguments)
                                           ◄─────────   frame(("batch", TokenBatch)) per batch, the last finished
                                           ◄─────────   or frame(("error", kind, message)), then closed
    close (done, aborted, cancelled)       ─────────►   the generate call is cancelled: the engine aborts it

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
import pickle
import secrets
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Callable
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
Generate = Callable[..., AsyncGenerator[TokenBatch, None]]


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
        pump = asyncio.ensure_future(self._pump(self._generate(*arguments), writer))
        gone = asyncio.ensure_future(reader.read(1))  # b"" (or an error) once the router closes
        try:
            await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not pump.done():
                pump.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)

    @staticmethod
    async def _pump(batches: AsyncGenerator[TokenBatch, None], writer: asyncio.StreamWriter) -> None:
        try:
            async for batch in batches:
                writer.write(frame(("batch", batch)))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the router raises it again
            writer.write(frame(_error(exc)))
            await writer.drain()
        finally:
            await batches.aclose()  # a router gone mid-batch: the call ends now (the engine aborts it)


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
