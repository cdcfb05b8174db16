from __future__ import annotations

import pytest
import torch

from services.proto_gen import kv_pb2
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.fingerprint import KVFingerprint

FP = KVFingerprint(model="llama-tiny", dtype="float32", block_size=16, num_layers=4, num_kv_heads=2, head_dim=64)


def test_equal_fingerprints_pass() -> None:
    FP.check(KVFingerprint.from_proto(FP.to_proto()))


def test_proto_round_trip_through_bytes() -> None:
    wire = FP.to_proto().SerializeToString()
    msg = kv_pb2.KVFingerprint()
    msg.ParseFromString(wire)
    assert KVFingerprint.from_proto(msg) == FP
    assert msg.head_dim == 64 and msg.dtype == "float32"


def test_mismatch_names_every_field_with_both_values() -> None:
    other = KVFingerprint(model="llama-big", dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=8, head_dim=64)
    with pytest.raises(KVIncompatible) as info:
        FP.check(other)
    msg = str(info.value)
    assert info.value.reason == "incompatible"
    assert isinstance(info.value, TransferError)
    assert "model: local='llama-tiny' remote='llama-big'" in msg
    assert "dtype: local='float32' remote='bfloat16'" in msg
    assert "num_kv_heads: local=2 remote=8" in msg
    for same in ("block_size", "num_layers", "head_dim"):
        assert same not in msg


@pytest.mark.parametrize(
    "field,value",
    [("model", ""), ("dtype", "int8"), ("block_size", 0), ("num_layers", -1), ("head_dim", 1.5)],
)
def test_invalid_fingerprint_rejected(field: str, value: object) -> None:
    kwargs = dict(model="m", dtype="float32", block_size=16, num_layers=4, num_kv_heads=2, head_dim=64)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        KVFingerprint(**kwargs)  # type: ignore[arg-type]


def test_from_empty_proto_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="model"):
        KVFingerprint.from_proto(kv_pb2.KVFingerprint())


def test_for_cache_and_payload_size() -> None:
    cache = torch.zeros(4, 2, 10, 16, 2, 64, dtype=torch.bfloat16)
    fp = KVFingerprint.for_cache("m", cache)
    assert (fp.dtype, fp.num_layers, fp.block_size, fp.num_kv_heads, fp.head_dim) == ("bfloat16", 4, 16, 2, 64)
    assert fp.payload_bytes(3) == 2 * 3 * 2 * 64 * 2
    with pytest.raises(ValueError, match="shape"):
        KVFingerprint.for_cache("m", torch.zeros(4, 3, 10, 16, 2, 64))


def test_transfer_error_reason_is_checked() -> None:
    assert TransferError("timeout", "x").reason == "timeout"
    with pytest.raises(ValueError, match="reason"):
        TransferError("nope")  # type: ignore[arg-type]
