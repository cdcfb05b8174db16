"""Wire format of one hand-off connection (tag messages on a single ucxx endpoint).

    prefill (KVSender)                         decode (KVReceiver)
    frame(KVFingerprint)          ───────────►  check against its own fingerprint
                                  ◄───────────  frame(HandshakeReply)   (closes if not ok)
    then any number of KV messages, each self-contained, of one or more parts:
    [ frame(KVHeader) | K [n, kv_heads, head_dim] | V [n, kv_heads, head_dim] ] ... [ u32 0 ]
    at most MAX_MESSAGE_BYTES; the u32 zero ends a message that is shorter than that.

A frame is a fixed FRAME_BYTES block: a little-endian u32 length, the serialised protobuf, zero
padding. A part is one KVHeader frame followed by K then V (as kv.proto says) of one layer's token
range; the sender splits a layer whose payload exceeds MAX_PAYLOAD_BYTES into several ranges, and
packs the parts queued in one event-loop iteration into one message (outbox.py). A part of at
least RAW_MIN_PAYLOAD_BYTES goes instead as a flagged frame alone, then K, then V as their own
messages (zero-copy from the sender's tensors). Messages are matched in wire order, so the
receiver handles them strictly in the order it posted its receives.

Why (measured, see receiver.py): every UCX completion that Python must see costs a wake-up chain
of a few hundred µs, far more than packing (a memcpy). Bounded, self-describing messages let the
receiver keep a ring of MAX_MESSAGE_BYTES receives posted ahead of time (UCX accepts a receive
buffer larger than the message; a smaller one fails with "message truncated"), so no receive
waits on Python to read a header first.
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
# A part with at least this much payload is not packed: its frame goes alone (flagged RAW_FOLLOWS)
# and K and V follow as the next two messages, sent from the caller's tensors without a copy.
RAW_MIN_PAYLOAD_BYTES = 1 << 20
_RAW_FOLLOWS = 1 << 31

M = TypeVar("M", bound=Message)


def encode_frame(msg: Message, raw_follows: bool = False) -> np.ndarray:
    """Serialise `msg` into a new FRAME_BYTES buffer; ValueError if it does not fit."""
    frame = np.zeros(FRAME_BYTES, dtype=np.uint8)
    write_frame(msg, frame, raw_follows)
    return frame


def write_frame(msg: Message, out: np.ndarray, raw_follows: bool = False) -> None:
    """Serialise `msg` as a frame into the first FRAME_BYTES of the uint8 array `out`."""
    body = msg.SerializeToString()
    if len(body) > MAX_FRAME_BODY:
        raise ValueError(f"{type(msg).__name__} is {len(body)} bytes serialised; a frame holds {MAX_FRAME_BODY}")
    word = len(body) | (_RAW_FOLLOWS if raw_follows else 0)
    out[: _LEN.size] = np.frombuffer(_LEN.pack(word), dtype=np.uint8)
    out[_LEN.size : _LEN.size + len(body)] = np.frombuffer(body, dtype=np.uint8)
    out[_LEN.size + len(body) : FRAME_BYTES] = 0


def frame_length(frame: np.ndarray) -> int:
    """The body length a frame declares (0 marks the end of a KV message's parts)."""
    return int(_LEN.unpack_from(frame[: _LEN.size].tobytes())[0]) & ~_RAW_FOLLOWS


def raw_follows(frame: np.ndarray) -> bool:
    """Whether this header's K and V come as the next two messages instead of after the frame."""
    return bool(_LEN.unpack_from(frame[: _LEN.size].tobytes())[0] & _RAW_FOLLOWS)


def decode_frame(frame: np.ndarray, msg_type: type[M]) -> M:
    """Parse a frame; ValueError when the length or the protobuf is malformed."""
    raw = frame[:FRAME_BYTES].tobytes()
    if len(raw) < FRAME_BYTES:
        raise ValueError(f"frame is {len(raw)} bytes, expected {FRAME_BYTES}")
    length = _LEN.unpack_from(raw)[0] & ~_RAW_FOLLOWS
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
