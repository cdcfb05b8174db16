"""The control connection: a TCP stream that carries the handshake opening a hand-off connection, then nothing.

    prefill (KVSender)                              decode (KVReceiver)
    connect to the advertised host:port
    frame(HandshakeRequest)             ─────────►  check every field, connect to the sender's worker
                                        ◄─────────  frame(HandshakeReply)   (closes if not ok)
    then nothing more: the connection stays open, and its end (EOF, a reset, or TCP keepalive giving
    up on a silent host) is how either side learns that the other is gone. KV headers and acks
    travel on the data path (native/, see sender.py).

A frame is a fixed FRAME_BYTES block: a little-endian u32 length, the serialised protobuf, zero
padding. A peer that sends anything else, or nothing within the timeout, is refused.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

FRAME_BYTES = 4096
_LEN = struct.Struct("<I")
MAX_FRAME_BODY = FRAME_BYTES - _LEN.size
# A control connection to a host that went silent ends after KEEPALIVE_IDLE_S + KEEPALIVE_COUNT probes
# KEEPALIVE_INTERVAL_S apart (about 11 s); a process that dies closes it at once.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 5, 2, 3

M = TypeVar("M", bound=Message)


def encode_frame(msg: Message) -> bytes:
    """Serialise `msg` into one frame; ValueError if it does not fit."""
    body = msg.SerializeToString()
    if len(body) > MAX_FRAME_BODY:
        raise ValueError(f"{type(msg).__name__} is {len(body)} bytes serialised; a frame holds {MAX_FRAME_BODY}")
    return _LEN.pack(len(body)) + body + bytes(MAX_FRAME_BODY - len(body))


def decode_frame(frame: bytes, msg_type: type[M]) -> M:
    """Parse a frame; ValueError when the length or the protobuf is malformed."""
    if len(frame) != FRAME_BYTES:
        raise ValueError(f"frame is {len(frame)} bytes, expected {FRAME_BYTES}")
    length = _LEN.unpack_from(frame)[0]
    if length > MAX_FRAME_BODY:
        raise ValueError(f"frame declares {length} bytes, more than the {MAX_FRAME_BODY} a frame holds")
    return parse(frame[_LEN.size : _LEN.size + length], msg_type)


def parse(data: bytes, msg_type: type[M]) -> M:
    """A protobuf message from bytes; ValueError when malformed."""
    msg = msg_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"cannot parse {msg_type.__name__}: {exc}") from None
    return msg


async def read_frame(reader: asyncio.StreamReader, msg_type: type[M]) -> M:
    """The next frame's message; ValueError for a malformed one, ConnectionError when the peer ends the stream first."""
    try:
        frame = await reader.readexactly(FRAME_BYTES)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionError(f"the peer closed the connection after {len(exc.partial)} bytes of a frame") from None
    return decode_frame(frame, msg_type)


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: Message, reply_type: type[M]
) -> M:
    """Send `message` as a frame and read the reply frame (the sender's half of the handshake)."""
    writer.write(encode_frame(message))
    await writer.drain()
    return await read_frame(reader, reply_type)


def keep_alive(writer: asyncio.StreamWriter) -> None:
    """Turn on TCP keepalive with the probes above, so a silent host ends the connection."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


async def until_closed(reader: asyncio.StreamReader) -> str:
    """Wait for the peer to end the connection (nothing else is due on it); returns how it ended."""
    try:
        data = await reader.read(1)
    except (ConnectionError, OSError) as exc:
        return repr(exc)
    return "sent on the control connection" if data else "closed"
