"""A rogue peer on a served decode worker's KV port (issue 17): garbage streams and handshakes, then real load.

The rogue knows what any host on the cluster's network can: the decode worker's KV address (GetLoad) and the
KV fingerprint (GetModelInfo's model plus config.json, public), and, as an insider would, the cluster's KV token.
It sends, on plain TCP connections, bytes that are not frames, frames that are not handshakes, and handshakes
that break one field each: the protocol, the layout, the token, the worker address, the tag, a shared region.
Each must be refused, the worker must keep its pid (UCX never saw the garbage), and the requests that follow
must all be exact, with no block held afterwards.
"""

from __future__ import annotations

import asyncio
import random
import time

from google.protobuf.message import Message

from services.engine.config import EngineConfig
from services.engine.model_config import load_model_config
from services.proto_gen import kv_pb2
from services.transfer.fingerprint import KVFingerprint
from services.transfer.handshake import HANDSHAKE_PROTOCOL
from services.transfer.peers import parse_peer
from services.transfer.wire import FRAME_BYTES, decode_frame, encode_frame
from tests.chaos.client import Client
from tests.chaos.deployment import Deployment
from tests.chaos.invariants import ScenarioResult, settle
from tests.chaos.workload import Reference, Req, prompts

# A UCX worker address made as a worker on that host makes its own (same devices, so of the same shape).
WORKER_ADDRESS = ("import sys\nfrom services.transfer import TransferConfig, native\n"
                  "TransferConfig(host=sys.argv[1]).apply_ucx_env()\nprint(native.Node().address.hex())")
ROGUE_TIMEOUT_S = 40.0  # a silent rogue is let go after the worker's KV timeout (--transfer-timeout-s)


def fingerprint(model_dir: str) -> KVFingerprint:
    """The served model's KV layout, from its config.json and the engine's defaults."""
    cfg, engine = load_model_config(model_dir), EngineConfig(model=model_dir)
    return KVFingerprint(model=cfg.name, dtype=engine.torch_dtype_name, block_size=engine.block_size,
                         num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)


def rogue_streams(fp: KVFingerprint, address: bytes, token: bytes) -> dict[str, tuple[bytes, str]]:
    """What the rogue sends on one connection each, by name. Its handshakes carry a real worker address (`address`,
    its own) and `token`, so that each is refused for the one field it breaks."""
    rng = random.Random(17)

    def hello(**fields: object) -> bytes:
        msg = kv_pb2.HandshakeRequest(fingerprint=fp.to_proto(), worker_address=address, tag=7,
                                      protocol=HANDSHAKE_PROTOCOL, token=token)
        for name, value in fields.items():
            if isinstance(value, Message):
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return encode_frame(msg)

    # What each is sent as, and what its refusal must name ("": closing the connection will do).
    streams = {
        "random bytes": (rng.randbytes(300), ""),
        "half a frame": (bytes(FRAME_BYTES // 2), ""),
        "a random frame": (rng.randbytes(FRAME_BYTES), ""),
        "a frame longer than it holds": (FRAME_BYTES.to_bytes(4, "little") + bytes(FRAME_BYTES - 4), "frame"),
        "HTTP": (b"GET / HTTP/1.1\r\nHost: kv\r\n\r\n", ""),
        "protocol 99": (hello(protocol=99), "protocol 99"),
        "another model's layout": (hello(fingerprint=KVFingerprint("other", "float32", 16, 2, 2, 8).to_proto()),
                                   "KV layouts differ"),
        "worker address of 64 random bytes, version 9": (hello(worker_address=bytes([0x09]) + rng.randbytes(63)),
                                                         "version 9"),
        "a truncated worker address": (hello(worker_address=address[:-1]), "worker address"),
        "an empty worker address": (hello(worker_address=b""), "0 bytes"),
        "an oversized worker address": (hello(worker_address=address + bytes(3000)), "worker address"),
        "tag 0": (hello(tag=0), "tag 0"),
        "a ring key cut short": (hello(staging=kv_pb2.SharedRegion(rkey=b"\x01" + bytes(8), address=1, bytes=8)),
                                 "staging"),
        "a cache of 0 bytes": (hello(cache=kv_pb2.SharedRegion(rkey=b"\x01" + bytes(8) + b"\0", address=1, bytes=0)),
                               "cache"),
    }
    if token:  # without one, the receiver takes any token (and this handshake would be a good one)
        streams["no token"] = (hello(token=b""), "no KV token")
        streams["a wrong token"] = (hello(token=token[:-1] + bytes([token[-1] ^ 1])), "wrong KV token")
    return streams


async def send_rogue(address: str, data: bytes) -> str:
    """Sends `data` on a new connection to `address`; "refused: ..." (a HandshakeReply that is not ok), "closed"
    (the worker hung up without one), or what else came back."""
    reader, writer = await asyncio.open_connection(*parse_peer(address))
    try:
        writer.write(data)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), ROGUE_TIMEOUT_S)
    finally:
        writer.transport.abort()
    if not answer:
        return "closed"
    if len(answer) != FRAME_BYTES:
        return f"{len(answer)} bytes that are not a frame"
    reply = decode_frame(answer, kv_pb2.HandshakeReply)
    return f"refused: {reply.error}" if not reply.ok else "ACCEPTED"


async def rogue_kv_peer(dep: Deployment, ref: Reference, model_dir: str, token: bytes = b"",
                        deadline_s: float = 60.0) -> ScenarioResult:
    """`token`: the cluster's KV token, which this rogue knows as an insider would (b"": the cluster has none)."""
    result = ScenarioResult("rogue peer on the KV port", dep.topology, recovery_expected=False)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        before = [w for w in (await client.load(False)).workers if w.role == "decode"]
        result.checks["every decode worker names its KV address"] = bool(before) and all(w.kv_address for w in before)
        if not result.checks["every decode worker names its KV address"]:
            return result
        address = bytes.fromhex(dep.python(WORKER_ADDRESS, dep.host_ip))
        streams = rogue_streams(fingerprint(model_dir), address, token)
        started = time.monotonic()
        answers = await asyncio.gather(*(asyncio.gather(*(send_rogue(w.kv_address, data) for w in before))
                                         for data, _ in streams.values()))
        for (name, (_, names)), said in zip(streams.items(), answers, strict=True):
            refused = all(a.startswith("refused: ") and names in a if names else a == "closed" or
                          a.startswith("refused: ") for a in said)
            result.checks[f"{name}, to each of {len(before)} decode workers: {said[0][:90]}"] = refused
        result.measured["rogue connections answered, s"] = round(time.monotonic() - started, 2)
        after = {w.worker: w for w in (await client.load(False)).workers if w.role == "decode"}
        for worker in before:
            now = after.get(worker.worker)
            result.checks[f"{worker.worker} kept its process (pid {worker.pid})"] = (
                now is not None and now.alive and now.pid == worker.pid)
        reqs = [Req(p, 16, "grpc" if i % 2 == 0 else "http", deadline_s) for i, p in enumerate(prompts("kv")[:8])]
        result.outcomes += await asyncio.gather(*(client.send(r) for r in reqs))
        result.errors_allowed = False
        settled = await settle(client)
        result.leaked_blocks, result.problems = settled.leaked_blocks, settled.problems
    return result
