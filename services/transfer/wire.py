"""Wire format of one hand-off connection (tag messages on a single ucxx endpoint, in order).

    prefill (KVSender)                         decode (KVReceiver)
    frame(KVFingerprint)          ───────────►  check against its own fingerprint
                                  ◄───────────  frame(HandshakeReply)   (closes if not ok)
    then, per layer of a request:
    frame(KVHeader)               ───────────►
    K: [num_tokens, kv_heads, head_dim]  ─────►  payload_bytes / 2
    V: [num_tokens, kv_heads, head_dim]  ─────►  payload_bytes / 2

A frame is a fixed FRAME_BYTES message: a little-endian u32 length, the serialised protobuf,
zero padding. Fixed-size control messages need no extra length message, and the receiver can
always post its receive before it knows what comes. The payload (K then V, as kv.proto says) is
sent as two messages so that the sender can hand UCX the two tensors without first copying them
into one buffer.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

FRAME_BYTES = 1024
_LEN = struct.Struct("<I")
MAX_MESSAGE_BYTES = FRAME_BYTES - _LEN.size

M = TypeVar("M", bound=Message)


def encode_frame(msg: Message) -> np.ndarray:
    """Serialise `msg` into a new FRAME_BYTES buffer; ValueError if it does not fit."""
    body = msg.SerializeToString()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{type(msg).__name__} is {len(body)} bytes serialised; a frame holds {MAX_MESSAGE_BYTES}")
    frame = np.zeros(FRAME_BYTES, dtype=np.uint8)
    frame[: _LEN.size] = np.frombuffer(_LEN.pack(len(body)), dtype=np.uint8)
    frame[_LEN.size : _LEN.size + len(body)] = np.frombuffer(body, dtype=np.uint8)
    return frame


def decode_frame(frame: np.ndarray, msg_type: type[M]) -> M:
    """Parse a frame; ValueError when the length or the protobuf is malformed."""
    raw = frame.tobytes()
    (length,) = _LEN.unpack_from(raw)
    if length > MAX_MESSAGE_BYTES:
        raise ValueError(f"frame declares {length} bytes, more than the {MAX_MESSAGE_BYTES} a frame holds")
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
