"""The KV hand-off with CUDA memory on either side, between two real processes. Skipped without a CUDA device.

Each side lives in a process of its own (multiprocessing, spawn; no Ray), as the prefill and
decode workers do: `Peer` runs a `Decode` or `Prefill` there and calls its methods over a pipe.
The cases: CUDA tensors registered in place into a CUDA kv_cache; host KV (the staging ring, host
tensors registered in place, the shared KV cache) into a CUDA kv_cache, which UCX fetches host
to device; CUDA tensors into a host kv_cache; and headers a CUDA receiver must refuse. KV is made
from a seed on both ends and must land bit for bit, in the expected blocks only.

Every case needs cuda_copy among UCX's transports, which TransferConfig adds where CUDA is
available: without it UCX takes device pointers for host memory and each fetch fails with
"Input/output error". On an H200 with UCX 1.21, every get that touches CUDA memory runs as UCX's
software emulation over sysv, ucx_perftest's ucp_get included (figures: services/bench/README.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import multiprocessing
import os
import random
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import pytest
import torch

from services.bench.transfer_actors import DecodeSide, PrefillSide, make_kv
from services.proto_gen import kv_pb2
from services.transfer import KVBlocks, KVFingerprint, KVTensors, TransferConfig
from services.transfer.kv import LayerKV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("libucx") is None, reason="needs UCX (`make setup` installs it)"),
]

GPU = "cuda"
FP = KVFingerprint(model="tiny", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
CFG = TransferConfig(timeout_s=5.0)
NUM_BLOCKS = 64
START_TIMEOUT_S = 60.0  # a process imports torch and opens CUDA first
CALL_TIMEOUT_S = 30.0
# (token_start, token_end, chunk): ranges that start and end mid-block, sent `chunk` tokens at a time.
REQUESTS = [(0, 9, 4), (5, 23, 5), (13, 14, 1), (2, 31, 31)]


# ---- the two ends, each run in a process of its own ----------------------------------------------


class Decode(DecodeSide):
    """The bench's decode end, with what the checks below look at."""

    def nonzero_blocks(self) -> list[int]:
        return torch.nonzero(self.kv_cache.flatten(3).abs().sum((0, 1, 3))).flatten().tolist()

    def clear(self) -> None:
        self.kv_cache.zero_()

    def num_connections(self) -> int:
        return self.receiver.num_connections


class Prefill(PrefillSide):
    """The bench's prefill end (its `send_request` submits every layer from a thread), plus awaited sends."""

    async def send(self, peer: str, request_id: str, token_start: int, num_tokens: int, seed: int, chunk: int) -> int:
        """Every layer with an awaited `send`, `chunk` tokens at a time; returns the bytes acknowledged."""
        await self.start()
        kv = self.kv(num_tokens, seed)
        table = self._write(kv, token_start) if self.cache is not None else []
        sent = 0
        for lo in range(0, num_tokens, chunk):
            n = min(chunk, num_tokens - lo)
            for layer in range(self.fp.num_layers):
                if self.cache is not None:
                    part: LayerKV = KVBlocks(n, table)
                else:
                    part = KVTensors(kv[layer, 0, lo : lo + n], kv[layer, 1, lo : lo + n])
                sent += await self.sender.send(peer, request_id, layer, token_start + lo, part)
        return sent

    def send_raw(self, peer: str, header: bytes) -> None:
        """Put bytes on the data path as if they were a header (the connection must be open)."""
        self.sender._links.by_peer[peer].data.send(header)

    def state(self) -> dict[str, Any]:
        conns = self.sender._links.by_peer
        return {
            "connects": self.sender.connects,
            "peers": list(conns),
            "pending": len(self.sender._in_flight.pending),
            "staged": [c.staged for c in conns.values()],
            "cached": [c.cached for c in conns.values()],
        }


# ---- running them in processes of their own ----------------------------------------------------


class RemoteError(Exception):
    """An exception raised in a Peer's process: its type name, TransferError reason (or ""), and message."""

    def __init__(self, kind: str, reason: str, message: str, trace: str) -> None:
        super().__init__(f"{kind}: {message}\n--- in the peer's process:\n{trace}")
        self.kind = kind
        self.reason = reason
        self.message = message


def _describe(exc: BaseException) -> tuple[str, str, str, str]:
    return type(exc).__name__, str(getattr(exc, "reason", "")), str(exc), traceback.format_exc()


def _serve(conn: Connection, cls: type, args: tuple[Any, ...]) -> None:
    try:
        asyncio.run(_serve_calls(conn, cls, args))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # UCX's and CUDA's teardown at exit only costs time here


async def _serve_calls(conn: Connection, cls: type, args: tuple[Any, ...]) -> None:
    loop = asyncio.get_running_loop()
    try:
        obj = cls(*args)
    except Exception as exc:
        conn.send(("err", _describe(exc)))
        return
    conn.send(("ok", None))
    method = ""
    while method != "close":
        try:
            method, call_args = await loop.run_in_executor(None, conn.recv)
        except EOFError:
            method, call_args = "close", ()
        try:
            result = getattr(obj, method)(*call_args)
            reply = ("ok", await result if inspect.isawaitable(result) else result)
        except Exception as exc:
            reply = ("err", _describe(exc))
        try:
            conn.send(reply)
        except OSError:
            method = "close"


class Peer:
    """`cls(*args)` in a spawned process with an event loop; `call` runs one of its methods there and waits."""

    def __init__(self, cls: type, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, cls, args), daemon=True)
        self.process.start()
        child.close()
        self._started = False

    def ready(self) -> None:
        if not self._started:
            self._reply("start-up", START_TIMEOUT_S)
            self._started = True

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        self.ready()
        self._conn.send((method, args))
        return self._reply(method, CALL_TIMEOUT_S if timeout is None else timeout)

    def _reply(self, what: str, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{what} did not answer within {timeout}s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the peer's process died during {what} (exit code {self.process.exitcode})") from None
        if status == "err":
            raise RemoteError(*value)
        return value

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.call("close", timeout=10)
        except Exception:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class Pair(NamedTuple):
    decode: Peer
    prefill: Peer
    addr: str


@contextmanager
def pair(
    decode_device: str,
    prefill_device: str,
    cache_blocks: int = 0,
    fp: KVFingerprint = FP,
    config: TransferConfig = CFG,
    num_blocks: int = NUM_BLOCKS,
) -> Iterator[Pair]:
    """A decode and a prefill process (started side by side), the receiver listening."""
    decode = Peer(Decode, fp, config, num_blocks, decode_device)
    prefill = Peer(Prefill, fp, config, cache_blocks, prefill_device)
    try:
        decode.ready()
        prefill.ready()
        assert prefill.call("start") == bool(cache_blocks), "UCX could not allocate the shared KV cache"
        yield Pair(decode, prefill, decode.call("start"))
    finally:
        prefill.stop()
        decode.stop()


# ---- checks --------------------------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def round_trips(p: Pair, fp: KVFingerprint = FP, seed: int = 0) -> None:
    """REQUESTS into random blocks, the first two with `send` layer by layer, the others with `submit`."""
    rng = random.Random(seed)
    free = rng.sample(range(NUM_BLOCKS), NUM_BLOCKS)
    used: list[int] = []
    for i, (start, end, chunk) in enumerate(REQUESTS):
        rid = f"r{seed}-{i}"
        nblocks = -(-end // fp.block_size)
        blocks, free = free[:nblocks], free[nblocks:]
        used += blocks[start // fp.block_size :]
        p.decode.call("expect", rid, blocks, start, end)
        if i < 2:
            sent = p.prefill.call("send", p.addr, rid, start, end - start, seed + i, chunk)
            assert sent == fp.num_layers * fp.payload_bytes(end - start)
        else:
            p.prefill.call("send_request", p.addr, rid, start, end - start, seed + i)
        p.decode.call("wait", rid)
        assert same_bits(p.decode.call("read", rid), make_kv(fp, end - start, seed + i)), rid
    assert set(p.decode.call("nonzero_blocks")) <= set(used)  # nothing outside the requests' blocks
    state = p.prefill.call("state")
    assert state["connects"] == 1 and state["pending"] == 0, state


# ---- the cases -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_tensors_land_in_a_cuda_cache(dtype: str) -> None:
    """CUDA K and V registered in place (awaited `send`, threaded `submit`) are fetched device to device."""
    fp = KVFingerprint(model="tiny", dtype=dtype, block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
    with pair(GPU, GPU, fp=fp) as p:
        round_trips(p, fp)
        assert p.prefill.call("state")["staged"] == [True]  # the ring is there, CUDA tensors go in place anyway


@pytest.mark.parametrize("source", ["staging_ring", "host_in_place", "shared_cache"])
def test_host_kv_lands_in_a_cuda_cache(source: str) -> None:
    """Host KV of every kind a prefill sends is fetched host to device into a CUDA kv_cache."""
    config = TransferConfig(timeout_s=CFG.timeout_s, staging_mib=0) if source == "host_in_place" else CFG
    with pair(GPU, "cpu", cache_blocks=NUM_BLOCKS if source == "shared_cache" else 0, config=config) as p:
        round_trips(p)
        state = p.prefill.call("state")
        assert state["cached"] == [source == "shared_cache"] and state["staged"] == [source != "host_in_place"]


def test_cuda_tensors_land_in_a_host_cache() -> None:
    """CUDA K and V registered in place are fetched device to host into a host kv_cache."""
    with pair("cpu", GPU) as p:
        round_trips(p)


def test_bad_headers_into_a_cuda_cache_are_refused() -> None:
    with pair(GPU, GPU) as p:
        # Tokens outside the expected range: the request fails, the connection stays in sync.
        p.decode.call("expect", "narrow", [8, 9], 2, 6)
        p.prefill.call("send", p.addr, "narrow", 0, 6, 1, 6)
        with pytest.raises(RemoteError) as info:
            p.decode.call("wait", "narrow")
        assert info.value.reason == "bad_header" and "outside the expected [2, 6)" in info.value.message
        p.decode.call("expect", "after", [10, 11], 0, 8)
        p.prefill.call("send", p.addr, "after", 0, 8, 2, 3)
        p.decode.call("wait", "after")
        assert same_bits(p.decode.call("read", "after"), make_kv(FP, 8, 2))
        assert p.decode.call("nonzero_blocks") == [10, 11]

        # A header that points outside the sender's staging ring: refused, the connection dropped.
        p.decode.call("expect", "far", [12], 0, 4)
        p.prefill.call("send", p.addr, "far", 0, 1, 3, 1)  # all layers of token 0
        header = kv_pb2.KVHeader(
            request_id="far",
            layer=0,
            token_start=1,
            num_tokens=1,
            payload_bytes=FP.payload_bytes(1),
            sequence=10**6,
            k_address=8,
            v_address=8 + FP.payload_bytes(1) // 2,
        )
        p.prefill.call("send_raw", p.addr, header.SerializeToString())
        with pytest.raises(RemoteError) as info:
            p.decode.call("wait", "far")
        assert info.value.reason == "bad_header" and "staging ring" in info.value.message
        for _ in range(100):
            if p.decode.call("num_connections") == 0 and not p.prefill.call("state")["peers"]:
                break
            time.sleep(0.02)
        assert p.decode.call("num_connections") == 0
        state = p.prefill.call("state")
        assert state["peers"] == [] and state["pending"] == 0, state
        assert p.decode.call("nonzero_blocks") == [10, 11, 12]  # block 12 holds token 0 only

        # The next request reconnects and lands exactly.
        p.decode.call("clear")
        p.decode.call("expect", "again", [3, 40], 1, 7)
        p.prefill.call("send_request", p.addr, "again", 1, 6, 4)
        p.decode.call("wait", "again")
        assert same_bits(p.decode.call("read", "again"), make_kv(FP, 6, 4))
        assert p.decode.call("nonzero_blocks") == [3, 40]
        assert p.prefill.call("state")["connects"] == 2
