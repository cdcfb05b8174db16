"""Frames of the control endpoint (ucxx tag messages): the handshake that opens a hand-off connection.

    prefill (KVSender)                              decode (KVReceiver)
    frame(HandshakeRequest)             ─────────►  check the fingerprint, connect to the worker
                                        ◄─────────  frame(HandshakeReply)   (closes if not ok)
    then nothing more: the endpoint stays open, and its failure is how either side learns that
    the other is gone. KV headers and acks travel on the data path (native/, see sender.py).

A frame is a fixed FRAME_BYTES block: a little-endian u32 length, the serialised protobuf, zero
padding.
"""

from __future__ import annotations

import struct
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

FRAME_BYTES = 4096
_LEN = struct.Struct("<I")
MAX_FRAME_BODY = FRAME_BYTES - _LEN.size

M = TypeVar("M", bound=Message)


def encode_frame(msg: Message) -> np.ndarray:
    """Serialise `msg` into a new FRAME_BYTES buffer; ValueError if it does not fit."""
    body = msg.SerializeToString()
    if len(body) > MAX_FRAME_BODY:
        raise ValueError(f"{type(msg).__name__} is {len(body)} bytes serialised; a frame holds {MAX_FRAME_BODY}")
    frame = np.zeros(FRAME_BYTES, dtype=np.uint8)
    frame[: _LEN.size] = np.frombuffer(_LEN.pack(len(body)), dtype=np.uint8)
    frame[_LEN.size : _LEN.size + len(body)] = np.frombuffer(body, dtype=np.uint8)
    return frame


def decode_frame(frame: np.ndarray, msg_type: type[M]) -> M:
    """Parse a frame; ValueError when the length or the protobuf is malformed."""
    raw = frame[:FRAME_BYTES].tobytes()
    if len(raw) < FRAME_BYTES:
        raise ValueError(f"frame is {len(raw)} bytes, expected {FRAME_BYTES}")
    length = _LEN.unpack_from(raw)[0]
    if length > MAX_FRAME_BODY:
        raise ValueError(f"frame declares {length} bytes, more than the {MAX_FRAME_BODY} a frame holds")
    return parse(raw[_LEN.size : _LEN.size + length], msg_type)


def parse(data: bytes, msg_type: type[M]) -> M:
    """A protobuf message from bytes; ValueError when malformed."""
    msg = msg_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"cannot parse {msg_type.__name__}: {exc}") from None
    return msg


def new_frame_buffer() -> np.ndarray:
    return np.empty(FRAME_BYTES, dtype=np.uint8)


async def request(ep: Any, message: Message, reply_type: type[M]) -> M:
    """Send `message` as a frame on a control endpoint and read the reply frame (the sender's half of the handshake)."""
    from services.transfer.ucx_ops import post_recv, post_send

    reply = new_frame_buffer()
    await post_send(ep, encode_frame(message))
    await post_recv(ep, reply)
    return decode_frame(reply, reply_type)
