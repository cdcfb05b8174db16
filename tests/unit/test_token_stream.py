"""The decode worker's token stream (services/worker/token_stream.py): real TCP on loopback, a generate of our own."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket

import pytest

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.transfer.errors import TransferError
from services.worker.messages import TokenBatch
from services.worker.token_stream import (
    HELLO,
    SendBatch,
    TokenServer,
    TokenStream,
    TokenStreamLost,
    WorkerStreamFailed,
    frame,
)

UNPICKLED: list[str] = []


class Tripwire:
    """Unpickling it leaves a mark: a frame from a peer without the secret must never get that far."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (UNPICKLED.append, ("tripped",))


class FakeWorker:
    """generate as the decode worker runs it: its batches are sent from another thread (the engine's)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.ended: list[str] = []
        self.failure: BaseException | None = None
        self.hang = False
        self.batch_tokens = 1  # token ids per batch

    async def generate(self, rid: str, count: int, *, send: SendBatch) -> None:
        self.calls.append((rid, count))
        try:
            if self.failure is not None:
                raise self.failure
            width = self.batch_tokens
            batches = [TokenBatch(list(range(i * width, (i + 1) * width)), i == count - 1 and not self.hang,
                                  "length" if i == count - 1 else None, 0) for i in range(count)]
            await asyncio.to_thread(lambda: [send(batch) for batch in batches])
            while self.hang:
                await asyncio.sleep(0.01)
            self.ended.append("finished")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise


async def serve(worker: FakeWorker) -> tuple[TokenServer, str, int]:
    server = TokenServer(worker.generate)
    address = await server.start("127.0.0.1")
    return server, address, int(address.rsplit(":", 1)[1])


async def ended(worker: FakeWorker) -> list[str]:
    """How the worker's call ended, once it has (within 3 s): its batches may reach the router before it returns."""
    for _ in range(300):
        if worker.ended:
            break
        await asyncio.sleep(0.01)
    return worker.ended


async def collect(stream: TokenStream) -> list[int]:
    async with stream:
        return [t for batch in [b async for b in stream] for t in batch.token_ids]


async def test_batches_arrive_in_order_and_the_last_is_finished() -> None:
    worker = FakeWorker()
    server, address, _ = await serve(worker)
    try:
        assert await collect(await TokenStream.open(address, server.secret, ("r1", 5))) == [0, 1, 2, 3, 4]
        assert worker.calls == [("r1", 5)] and await ended(worker) == ["finished"]
    finally:
        server.close()


async def test_batches_the_socket_cannot_take_at_once_wait_and_arrive_whole_in_order() -> None:
    """40 batches of about 1 MiB each, sent from the engine's thread while the router reads nothing: most wait in
    the worker's backlog until the router reads, then arrive whole and in order, the finished one last."""
    worker = FakeWorker()
    worker.batch_tokens = 100_000
    server, address, _ = await serve(worker)
    try:
        stream = await TokenStream.open(address, server.secret, ("r1", 40))
        assert await ended(worker) == ["finished"]  # it has sent what the socket took, and holds the rest
        assert await collect(stream) == list(range(40 * 100_000))
    finally:
        server.close()


@pytest.mark.parametrize("kind, error", [
    ("invalid", InvalidRequest("the prompt is too long")),
    ("exhausted", ResourceExhausted("no free KV blocks")),
    ("transfer", TransferError("peer_gone", "the prefill worker did not deliver")),
    ("other", KeyError("boom")),
])
async def test_the_calls_errors_are_raised_again_at_the_router(kind: str, error: BaseException) -> None:
    worker = FakeWorker()
    worker.failure = error
    server, address, _ = await serve(worker)
    try:
        with pytest.raises(Exception) as raised:
            await collect(await TokenStream.open(address, server.secret, ("r1", 3)))
        if kind == "other":
            assert isinstance(raised.value, WorkerStreamFailed) and "boom" in str(raised.value)
        else:
            assert type(raised.value) is type(error) and str(raised.value) == str(error)
        if kind == "transfer":
            assert isinstance(raised.value, TransferError) and raised.value.reason == "peer_gone"
    finally:
        server.close()


@pytest.mark.parametrize("batch_tokens", [1, 100_000])
async def test_closing_early_cancels_the_call_on_the_worker(batch_tokens: int) -> None:
    """At 100,000 tokens a batch (about 1 MiB), most of the 40 batches still wait in the worker's backlog when the
    router goes; the server serves the next call."""
    worker = FakeWorker()
    worker.batch_tokens, worker.hang = batch_tokens, True
    server, address, _ = await serve(worker)
    try:
        stream = await TokenStream.open(address, server.secret, ("r1", 40))
        async with stream:
            async for batch in stream:
                assert batch.token_ids[0] == 0
                break
        assert await ended(worker) == ["cancelled"]
        worker.batch_tokens, worker.hang = 1, False
        assert await collect(await TokenStream.open(address, server.secret, ("r2", 2))) == [0, 1]
    finally:
        server.close()


@pytest.mark.parametrize("sent", [
    b"",
    HELLO[:5],
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    os.urandom(200),
    HELLO + bytes(32) + frame(Tripwire()),  # the wrong secret, then a frame that must never be unpickled
])
async def test_a_peer_without_the_secret_is_refused_before_anything_is_parsed(sent: bytes) -> None:
    UNPICKLED.clear()
    worker = FakeWorker()
    server, address, port = await serve(worker)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 15) == b""  # closed on it, nothing sent back
        writer.close()
        assert UNPICKLED == [] and worker.calls == []
        # The server still serves the router.
        assert await collect(await TokenStream.open(address, server.secret, ("r2", 2))) == [0, 1]
    finally:
        server.close()


async def test_garbage_after_the_secret_is_refused_and_the_server_carries_on() -> None:
    worker = FakeWorker()
    server, address, port = await serve(worker)
    try:
        for body in (b"\xff\xff\xff\xff", (5).to_bytes(4, "little") + b"nope!", frame(["not", "a", "tuple"])):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HELLO + server.secret + body)
            assert await asyncio.wait_for(reader.read(), 15) == b""
            writer.close()
        assert worker.calls == []
        assert await collect(await TokenStream.open(address, server.secret, ("r3", 1))) == [0]
    finally:
        server.close()


async def test_a_stream_that_ends_before_the_finished_batch_is_lost() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def one_batch_then_gone() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(frame(("batch", TokenBatch([7], False, None, 0))))
        conn.close()

    task = asyncio.get_running_loop().run_in_executor(None, one_batch_then_gone)
    stream = await TokenStream.open(f"127.0.0.1:{port}", bytes(32), ("r1", 1))
    seen = []
    with pytest.raises(TokenStreamLost):
        async with stream:
            async for batch in stream:
                seen += batch.token_ids
    await task
    listener.close()
    assert seen == [7]


async def test_nobody_listening_is_a_lost_stream() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TokenStreamLost, match="cannot reach"):
        await TokenStream.open(f"127.0.0.1:{port}", bytes(32), ())


def test_the_secret_stays_out_of_reprs() -> None:
    from services.worker.messages import WorkerInfo

    info = WorkerInfo("decode-0", "decode", None, 16, 64, "127.0.0.1:1", b"s" * 32)
    assert "sss" not in repr(info) and pickle.loads(pickle.dumps(info)).token_secret == b"s" * 32
