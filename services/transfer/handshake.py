"""What a peer's handshake must satisfy before any of it reaches UCX, and the cluster's KV token.

Trust on the KV channel: nothing a network peer sends is unpickled or evaluated anywhere in
services/transfer. Handshakes and acks are protobuf messages in fixed frames (wire.py), KV headers
are protobuf too (checked by recv_paths.header_problem; the C fast path in native/kvx_route.c
parses the same header with bounds and hands anything unusual to Python), and the UCX worker
addresses and remote keys a peer gives are walked with bounds (ucx_formats.py) before UCX parses
them. The checks run in this order, and a refused peer gets a HandshakeReply(ok=False) naming the
reason, then the endpoint closes; the receiver logs the refusal and goes on serving:

    protocol == HANDSHAKE_PROTOCOL      the frame layout both sides speak
    token                               hmac.compare_digest with this side's token, when it has one
    fingerprint                         KVFingerprint.check (the layout of the KV both sides hold)
    worker_address, tag                 ucx_formats.address_problem; a tag of 0 names no connection
    staging, cache (each optional)      rkey_problem; a nonzero address; 0 < bytes <= MAX_REGION_BYTES

The token is a shared secret, sent as is: it keeps out peers that cannot read the cluster's network
(the KV channel is not encrypted, as Ray's own token is not). Without one, a deployment's KV channel
accepts any peer that passes the checks above, and each process says so once in its log.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

from services.env import ENV
from services.transfer.config import TransferConfig
from services.transfer.ucx_formats import AddressShape, address_problem, rkey_problem

log = logging.getLogger(__name__)
HANDSHAKE_PROTOCOL = 1
MAX_TOKEN_BYTES = 1024
MAX_REGION_BYTES = 1 << 40
_warned_open = False


def load_token(config: TransferConfig) -> bytes:
    """The KV token: `config.token_file`'s content, else env PDSERVE_KV_TOKEN, stripped of surrounding whitespace.

    b"" when neither is set (logged once per process). ValueError for a file that cannot be read or is empty,
    or a token over MAX_TOKEN_BYTES.
    """
    global _warned_open
    if config.token_file:
        try:
            token = Path(config.token_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the KV token file {config.token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"the KV token file {config.token_file} is empty")
    else:
        token = ENV.kv_token.strip().encode()
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"the KV token is {len(token)} bytes; at most {MAX_TOKEN_BYTES}")
    if not token and not _warned_open:
        _warned_open = True
        log.warning("the KV channel is unauthenticated: no --kv-token-file or PDSERVE_KV_TOKEN, so any peer that "
                    "reaches a decode worker's KV port may send it KV")
    return token


def token_problem(offered: bytes, token: bytes) -> str:
    """Why a peer's token is refused, or "" (always "" when this side has none)."""
    if not token:
        return ""
    if not offered:
        return "no KV token (this cluster requires one)"
    if not hmac.compare_digest(offered, token):
        return "wrong KV token"
    return ""


def region_problem(region: Any, what: str) -> str:
    """Why a SharedRegion message of a peer's cannot be opened, or ""."""
    problem = rkey_problem(region.rkey)
    if problem:
        return f"{what}: {problem}"
    if not region.address or not 0 < region.bytes <= MAX_REGION_BYTES or region.address + region.bytes >= 1 << 64:
        return f"{what}: address {region.address:#x} and size {region.bytes} do not make a region"
    return ""


def hello_problem(hello: Any, token: bytes) -> str:
    """Why a HandshakeRequest is refused before its fingerprint is looked at, or "" (see the module docstring)."""
    if hello.protocol != HANDSHAKE_PROTOCOL:
        return f"handshake protocol {hello.protocol}, this side speaks {HANDSHAKE_PROTOCOL}"
    return token_problem(hello.token, token)


def peer_problem(message: Any, own: AddressShape) -> str:
    """Why the data-path parts of a HandshakeRequest or HandshakeReply are refused, or ""."""
    problem = address_problem(message.worker_address, own)
    if problem:
        return problem
    if message.tag == 0:
        return "handshake with tag 0"
    for name in ("staging", "cache"):
        region = message.DESCRIPTOR.fields_by_name[name]
        if region.message_type is not None and message.HasField(name):  # the request's regions (bools in a reply)
            problem = region_problem(getattr(message, name), f"shared {name} region")
            if problem:
                return problem
    return ""
