"""What a network peer can put on the KV channel, parsed without UCX: every malformed frame, header, worker address
or key is refused with a clear error, never an exception of another kind (and never evaluated or unpickled)."""

from __future__ import annotations

import random

import pytest

from services.proto_gen import kv_pb2
from services.transfer.fingerprint import KVFingerprint
from services.transfer.recv_paths import header_problem
from services.transfer.ucx_formats import FormatError, address_problem, rkey_problem, walk_address
from services.transfer.wire import FRAME_BYTES, MAX_FRAME_BODY, decode_frame, encode_frame, parse

FP = KVFingerprint(model="tiny", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
TOKEN_BYTES = FP.payload_bytes(1) // 2
# A worker address as this machine's UCX 1.21 packs it (v1: uuid, then 5 devices: self, tcp on two interfaces
# (IPv4 and IPv6 device addresses), sysv, posix, cma), taken from services.transfer.native.Node().address.
OWN_ADDRESS = bytes.fromhex(
    "208ebc8e07e9c8cf0b0000637577cc2b320040975000000000004f03008823332c0a605ea9e801060002c0000202cf1917b7"
    "51389763344bd7e037370013230082e7c701120102ff4e47af0086c5c9f9ffffef00000000cf1917b75138539e3e4bd7e03737"
    "011323008286a90208ff4e47af0086c5498d5377cc2b320000705077ccab33004f2300880d806500000000000308ff4e47af00"
    "86c549a7d377cc2b320000705077ccab33004f2300884e1a0000040000c00408ff4e47af0086c549478bbd37063600242e5077"
    "ccab3300922100844e1a00008580"
)


def test_own_address_walks_to_its_end() -> None:
    shape = walk_address(OWN_ADDRESS)
    assert address_problem(OWN_ADDRESS, shape) == ""
    assert shape.header == b"\x20" and len(shape.transports) == 5
    assert shape.transports[0x19CF] == {(6, 2), (18, 2)}  # tcp: an IPv4 and an IPv6 device


def test_every_truncation_and_extension_of_an_address_is_refused() -> None:
    own = walk_address(OWN_ADDRESS)
    for end in range(len(OWN_ADDRESS)):
        assert address_problem(OWN_ADDRESS[:end], own), end
    for extra in (b"\0", b"\xff" * 7):
        assert "past its end" in address_problem(OWN_ADDRESS + extra, own)


def test_single_byte_changes_of_an_address_walk_cleanly() -> None:
    """Any byte set to any value either walks to the end in bounds or is refused as a FormatError."""
    own = walk_address(OWN_ADDRESS)
    rng = random.Random(0)
    refused = 0
    for index in range(len(OWN_ADDRESS)):
        for value in {0x00, 0x1F, 0x3F, 0x7F, 0x80, 0xFF, rng.randrange(256)}:
            changed = bytearray(OWN_ADDRESS)
            changed[index] = value
            try:
                walk_address(bytes(changed))
            except FormatError:
                refused += 1
            refused += bool(address_problem(bytes(changed), own))
    assert refused > 0


def test_random_addresses_are_refused() -> None:
    own = walk_address(OWN_ADDRESS)
    rng = random.Random(1)
    for n in (0, 1, 2, 9, 64, 217, 4096):
        for _ in range(50):
            assert address_problem(rng.randbytes(n), own)


def test_address_with_a_transport_shape_this_host_never_packs_is_refused() -> None:
    own = walk_address(OWN_ADDRESS)
    # The tcp device at byte 50 (md 1, IPv4: 6 bytes) as an empty device address: UCX would give tcp a NULL one.
    at = OWN_ADDRESS.index(bytes.fromhex("01060002c00002"))
    changed = OWN_ADDRESS[: at + 1] + bytes([0x00]) + OWN_ADDRESS[at + 8 :]
    assert "lengths [(0, 2), (18, 2)], where this UCX packs [(6, 2), (18, 2)]" in address_problem(changed, own)


@pytest.mark.parametrize(
    "rkey,says",
    [
        (b"", "0 bytes"),
        (bytes(8), "8 bytes"),
        (b"\x01" + bytes(7) + b"\x0a", "memory type 10"),
        (b"\x03" + bytes(7) + b"\x00\x00", "ends inside"),
        (b"\x01" + bytes(7) + b"\x00\x05abc", "ends inside its md key"),
        (b"\x01" + bytes(2000), "not 9..1024"),
    ],
)
def test_bad_remote_keys_are_refused(rkey: bytes, says: str) -> None:
    assert says in rkey_problem(rkey)


def test_real_remote_keys_pass() -> None:
    assert rkey_problem(bytes.fromhex("000000000000000000ff")) == ""  # UCX_TLS=tcp: no memory domain needs a key
    assert rkey_problem(bytes.fromhex("01000000000000000000ff")) == ""  # registered host memory, md 0 (self)
    assert rkey_problem(bytes.fromhex("050000000000000000000c3180650000a07b91677f0000ff")) == ""  # shared memory


def test_random_bytes_are_refused_as_kv_headers() -> None:
    rng = random.Random(2)
    for n in [1, 2, 5, 40, 300, 5000] * 40:
        data = rng.randbytes(n)
        try:
            hdr = parse(data, kv_pb2.KVHeader)
        except ValueError:
            continue
        assert header_problem(hdr, FP, TOKEN_BYTES, None, None), hdr


def test_truncated_headers_are_refused() -> None:
    whole = kv_pb2.KVHeader(
        request_id="req", layer=1, token_start=0, num_tokens=4, payload_bytes=2 * 4 * TOKEN_BYTES, sequence=9,
        k_address=4096, v_address=8192, k_rkey=bytes.fromhex("01000000000000000000ff"),
        v_rkey=bytes.fromhex("01000000000000000000ff"),
    ).SerializeToString()
    hdr = parse(whole, kv_pb2.KVHeader)
    assert header_problem(hdr, FP, TOKEN_BYTES, None, None) == ""
    for end in range(len(whole)):
        try:
            cut = parse(whole[:end], kv_pb2.KVHeader)
        except ValueError:
            continue
        assert header_problem(cut, FP, TOKEN_BYTES, None, None), end


@pytest.mark.parametrize(
    "fields,says",
    [
        ({"layer": 3}, "layer 3 out of range"),
        ({"layer": 2**32 - 1}, "out of range"),
        ({"num_tokens": 0, "payload_bytes": 0}, "num_tokens=0"),
        ({"num_tokens": 2**32 - 1}, "payload_bytes"),
        ({"payload_bytes": 2**64 - 1}, "payload_bytes"),
        ({"k_address": 0}, "without the addresses"),
        ({"v_rkey": b""}, "only one key"),
        ({"k_rkey": b"\x09" * 12, "v_rkey": b"\x09" * 12}, "bad key"),
        ({"k_rkey": b"", "v_rkey": b""}, "outside the sender's staging ring"),
        ({"k_rkey": b"", "v_rkey": b"", "source_blocks": [0]}, "outside the sender's shared KV cache"),
        ({"k_rkey": b"", "v_rkey": b"", "source_blocks": [2**32 - 1], "source_offset": 2**32 - 1},
         "do not hold its tokens"),
        ({"source_blocks": [1] * 5000}, "5000 cache blocks"),
    ],
)
def test_out_of_range_header_fields_are_refused(fields: dict[str, object], says: str) -> None:
    base: dict[str, object] = {
        "request_id": "req", "layer": 0, "num_tokens": 4, "payload_bytes": 2 * 4 * TOKEN_BYTES,
        "k_address": 4096, "v_address": 8192, "k_rkey": bytes.fromhex("01000000000000000000ff"),
        "v_rkey": bytes.fromhex("01000000000000000000ff"),
    }
    hdr = kv_pb2.KVHeader(**{**base, **fields})
    assert says in header_problem(hdr, FP, TOKEN_BYTES, None, None)


def test_bad_frames_are_refused() -> None:
    ok = encode_frame(kv_pb2.HandshakeReply(ok=True, tag=3))
    assert decode_frame(ok, kv_pb2.HandshakeReply).tag == 3
    with pytest.raises(ValueError, match="expected 4096"):
        decode_frame(ok[:100], kv_pb2.HandshakeReply)
    too_long = (MAX_FRAME_BODY + 1).to_bytes(4, "little") + ok[4:]
    with pytest.raises(ValueError, match="more than"):
        decode_frame(too_long, kv_pb2.HandshakeReply)
    with pytest.raises(ValueError, match="does not fit|a frame holds"):
        encode_frame(kv_pb2.HandshakeRequest(worker_address=bytes(FRAME_BYTES)))
    rng = random.Random(4)
    for _ in range(300):
        frame = rng.randrange(MAX_FRAME_BODY).to_bytes(4, "little") + rng.randbytes(FRAME_BYTES - 4)
        try:
            decode_frame(frame, kv_pb2.HandshakeRequest)
        except ValueError:
            pass
