"""UCX's packed worker addresses and remote keys, walked with bounds before a peer's bytes reach UCX.

UCP parses both from a bare pointer with no length (`ucp_ep_create` with a remote address,
`ucp_ep_rkey_unpack`): it trusts the lengths and flags inside the bytes, and it aborts the whole
process on an address version it does not know (`address.c: *addr_version ==
UCP_OBJECT_VERSION_V2`). So a peer's address or key is first walked here the way UCP 1.21 walks it
(src/ucp/wireup/address.c `ucp_address_unpack`, src/ucp/core/ucp_rkey.c
`ucp_ep_rkey_unpack_internal`), and refused unless UCP would stop exactly at its end having read
only what this process's own worker would have written:

    worker address, as this process's worker packs it (`Node.address`, the reference):
    [header: version 4 | flags 4 (v1), or version 4 | release 4, flags 8 (v2)] [uuid 8]
    per device:  [md index 1(+1)] [flags 3 | length 5 (+1)] [paths 1]? [sys dev 1]? [device address]
      per transport:  [name checksum 2] [attributes 16 (v1) or 8 (v2)]
                      [last 1 | has-ep 1 | length 6 (+1)] [interface address]

    remote key:  [md map 8] [memory type 1] per set bit: [length 1] [transport key]  [system devices...]

A peer must use this process's header byte(s) (same UCX, same settings), carry no debug name, no
endpoint addresses and nothing past the end, and for each transport this process also has, give
device and interface addresses of lengths this process's own address shows for it (a transport
reads its address at the length it expects, and takes a missing device address as NULL).
Transports this process lacks (CUDA ones on a CPU host) are skipped by UCP, so they pass.
What a transport then makes of an address of the right shape is UCX's business; the KV token
(handshake.py) is what keeps strangers out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAX_ADDRESS_BYTES = 2048
MAX_RKEY_BYTES = 1024
PAD_BYTES = 256  # zeros after what is passed to UCX: a transport key read at its own length stays in bounds
MAX_RESOURCES = 128  # UCP_MAX_RESOURCES
MAX_MDS = 64  # UCP_MD_INDEX_BITS
MEMORY_TYPES = 10  # UCS_MEMORY_TYPE_LAST in UCX 1.21 (host, cuda, ..., gaudi)

VERSION_V1, VERSION_V2 = 0, 1
FLAG_DEBUG_INFO, FLAG_WORKER_UUID, FLAG_CLIENT_ID, FLAG_AM_ONLY = 1, 2, 4, 8
NULL_RESOURCE = 0xFF
_LAST, _NUM_PATHS, _SYS_DEVICE, _HAS_EP, _EMPTY_DEV = 0x80, 0x40, 0x20, 0x40, 0x80


class FormatError(ValueError):
    """A peer's UCX address or key that UCX must not see; the message says what is wrong."""


@dataclass
class AddressShape:
    """What walking an address found: its header and, per transport checksum, the (device, interface) lengths."""

    header: bytes
    flags: int
    transports: dict[int, set[tuple[int, int]]] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.at, self.what = data, 0, what

    def take(self, n: int, name: str) -> bytes:
        if self.at + n > len(self.data):
            raise FormatError(f"{self.what} ends inside its {name} (byte {self.at} of {len(self.data)})")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def byte(self, name: str) -> int:
        return self.take(1, name)[0]

    def extended(self, first: int, mask: int, version: int, name: str) -> int:
        """A value packed in `mask` bits of `first`; in v2, all-ones means it continues in the next byte."""
        value = first & mask
        return self.byte(name) if version == VERSION_V2 and value == mask else value


def walk_address(address: bytes) -> AddressShape:
    """Walk a packed UCP worker address as UCP would; FormatError for anything it would misread or reject."""
    if not isinstance(address, bytes) or not 2 <= len(address) <= MAX_ADDRESS_BYTES:
        raise FormatError(f"worker address of {len(address)} bytes, not 2..{MAX_ADDRESS_BYTES}")
    r = _Reader(address, "worker address")
    first = r.byte("header")
    version = first & 0x0F
    if version == VERSION_V1:
        flags = first >> 4
    elif version == VERSION_V2:
        flags = r.byte("header flags")
    else:
        raise FormatError(f"worker address version {version}: UCX knows 0 (v1) and 1 (v2)")
    shape = AddressShape(address[: r.at], flags)
    if flags & (FLAG_DEBUG_INFO | FLAG_AM_ONLY) or not flags & FLAG_WORKER_UUID:
        raise FormatError(f"worker address flags {flags:#x}: want a worker uuid and no debug name or AM-only mark")
    r.take(8, "worker uuid")
    if flags & FLAG_CLIENT_ID:
        r.take(8, "client id")
    if address[r.at : r.at + 1] == bytes([NULL_RESOURCE]):
        raise FormatError("worker address lists no transports")
    count = 0
    last_dev = False
    while not last_dev:
        md_byte = r.byte("md index")
        md_index = r.extended(md_byte, 0x1F if version == VERSION_V1 else 0x7F, version, "md index")
        if md_index >= MAX_MDS:
            raise FormatError(f"worker address md index {md_index} >= {MAX_MDS}")
        dev_byte = r.byte("device address length")
        last_dev = bool(dev_byte & _LAST)
        dev_len = r.extended(dev_byte, 0x1F, version, "device address length")
        if dev_byte & _NUM_PATHS and r.byte("number of paths") == 0:
            raise FormatError("worker address device with 0 paths")
        if dev_byte & _SYS_DEVICE:
            r.byte("system device")
        r.take(dev_len, "device address")
        last_tl = bool(md_byte & _EMPTY_DEV)
        while not last_tl:
            count += 1
            if count > MAX_RESOURCES:
                raise FormatError(f"worker address has more than {MAX_RESOURCES} transports")
            (csum,) = struct.unpack("<H", r.take(2, "transport checksum"))
            r.take(16 if version == VERSION_V1 else 8, "transport attributes")
            len_byte = r.byte("interface address length")
            last_tl = bool(len_byte & _LAST)
            if len_byte & _HAS_EP:
                raise FormatError("worker address carries endpoint addresses")
            iface_len = r.extended(len_byte, 0x3F, version, "interface address length")
            r.take(iface_len, "interface address")
            shape.transports.setdefault(csum, set()).add((dev_len, iface_len))
    if r.at != len(address):
        raise FormatError(f"worker address has {len(address) - r.at} bytes past its end (at byte {r.at})")
    return shape


def address_problem(address: bytes, own: AddressShape) -> str:
    """Why a peer's worker address must not reach UCX, or "" (`own`: this process's worker's, walked)."""
    try:
        shape = walk_address(address)
    except FormatError as exc:
        return str(exc)
    if shape.header != own.header or shape.flags != own.flags:
        return (f"worker address header {shape.header.hex()} (flags {shape.flags:#x}) is not this UCX's "
                f"{own.header.hex()} (flags {own.flags:#x})")
    for csum, lengths in shape.transports.items():
        known = own.transports.get(csum)
        if known is not None and not lengths <= known:
            return (f"worker address transport {csum:#06x} with (device, interface) address lengths "
                    f"{sorted(lengths)}, where this UCX packs {sorted(known)}")
    return ""


def rkey_problem(rkey: bytes) -> str:
    """Why a peer's packed remote key must not reach UCX, or "" (what follows the md keys UCP skips)."""
    if not isinstance(rkey, bytes) or not 9 <= len(rkey) <= MAX_RKEY_BYTES:
        return f"remote key of {len(rkey)} bytes, not 9..{MAX_RKEY_BYTES}"
    r = _Reader(rkey, "remote key")
    (md_map,) = struct.unpack("<Q", r.take(8, "md map"))  # 0 is fine: tcp alone needs no key
    mem_type = r.byte("memory type")
    if mem_type >= MEMORY_TYPES:
        return f"remote key memory type {mem_type} >= {MEMORY_TYPES}"
    try:
        for _ in range(bin(md_map).count("1")):
            r.take(r.byte("md key length"), "md key")
    except FormatError as exc:
        return str(exc)
    return ""


def padded(data: bytes) -> bytes:
    """`data` with PAD_BYTES zeros after it, for passing to UCX (the walk above stopped at its end)."""
    return data + bytes(PAD_BYTES)
