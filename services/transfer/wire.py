"""Wire format of one hand-off connection (tag messages on a single ucxx endpoint).

    prefill (KVSender)                         decode (KVReceiver)
    frame(KVFingerprint)          ───────────►  check against its own fingerprint
                                  ◄───────────  frame(HandshakeReply)   (closes if not ok)
    then any number of KV messages, each self-contained:
    [ frame(KVHeader) | K [n, kv_heads, head_dim] | V [n, kv_heads, head_dim] ]   ≤ MAX_MESSAGE_BYTES

A frame is a fixed FRAME_BYTES block: a little-endian u32 length, the serialised protobuf, zero
padding. A KV message packs the header and one layer's K and V for a token range (K then V, as
kv.proto says) into ONE tag message, at most MAX_MESSAGE_BYTES long; the sender splits a layer
whose payload is larger into several token ranges. Why (measured, see receiver.py): every UCX
completion that Python must see costs an event-loop wake-up of a few hundred µs, far more than
packing (a memcpy). One bounded, self-describing message per layer lets the receiver keep a ring
of MAX_MESSAGE_BYTES receives posted ahead of time (UCX accepts a receive buffer larger than the
message), so no receive ever waits on Python to read a header first, and messages need no order.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

FRAME_BYTES = 1024
_LEN = struct.Struct("<I")
MAX_FRAME_BODY = FRAME_BYTES - _LEN.size
# Upper bound of one KV message (header frame + K + V); the receiver's pre-posted buffers have this size.
MAX_MESSAGE_BYTES = 4 << 20
MAX_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - FRAME_BYTES

M = TypeVar("M", bound=Message)


def encode_frame(msg: Message) -> np.ndarray:
    """Serialise `msg` into a new FRAME_BYTES buffer; ValueError if it does not fit."""
    body = msg.SerializeToString()
    frame = np.zeros(FRAME_BYTES, dtype=np.uint8)
    write_frame(msg, frame)
    return frame


def write_frame(msg: Message, out: np.ndarray) -> None:
    """Serialise `msg` as a frame into the first FRAME_BYTES of the uint8 array `out`."""
    body = msg.SerializeToString()
    if len(body) > MAX_FRAME_BODY:
        raise ValueError(f"{type(msg).__name__} is {len(body)} bytes serialised; a frame holds {MAX_FRAME_BODY}")
    out[: _LEN.size] = np.frombuffer(_LEN.pack(len(body)), dtype=np.uint8)
    out[_LEN.size : _LEN.size + len(body)] = np.frombuffer(body, dtype=np.uint8)
    out[_LEN.size + len(body) : FRAME_BYTES] = 0


def decode_frame(frame: np.ndarray, msg_type: type[M]) -> M:
    """Parse a frame; ValueError when the length or the protobuf is malformed."""
    raw = frame[:FRAME_BYTES].tobytes()
    if len(raw) < FRAME_BYTES:
        raise ValueError(f"frame is {len(raw)} bytes, expected {FRAME_BYTES}")
    (length,) = _LEN.unpack_from(raw)
    if length > MAX_FRAME_BODY:
        raise ValueError(f"frame declares {length} bytes, more than the {MAX_FRAME_BODY} a frame holds")
    msg = msg_type()
    try:
        msg.ParseFromString(raw[_LEN.size : _LEN.size + length])
    except DecodeError as exc:
        raise ValueError(f"cannot parse {msg_type.__name__}: {exc}") from None
    return msg


def new_frame_buffer() -> np.ndarray:
    return np.empty(FRAME_BYTES, dtype=np.uint8)


def as_ucx_buffer(t: torch.Tensor) -> object:
    """A zero-copy byte view of a contiguous tensor that ucxx can send from or receive into.

    CPU tensors become a uint8 numpy array (works for bfloat16 too); CUDA tensors are passed as a
    uint8 tensor, which exposes `__cuda_array_interface__`.
    """
    if not t.is_contiguous():
        raise ValueError("as_ucx_buffer needs a contiguous tensor")
    flat = t.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()
