"""Python side of kvx.c and kvx_route.c, the hand-off's data path: build on first use, then thin ctypes wrappers.

- library.py: compiling the C sources against the libucx wheel's UCX, and loading them (`build`, `lib`)
- node.py: the process's UCP worker with its progress thread (`Node`) and endpoints to peers (`Connection`)
- memory.py: regions UCX knows (`Region`), a peer's (`RemoteKey`), and the runs to copy between them (`Pieces`)
- sink.py: a KV cache that the message callback places routed headers into (`Sink`)

Calls go through ctypes, which releases the GIL while C runs: a fetch copies while Python threads go on.
"""

from __future__ import annotations

from services.transfer.native.library import (
    UCS_ERR_INVALID_ADDR,
    UCS_ERR_NOT_CONNECTED,
    UCS_ERR_TIMED_OUT,
    NativeError,
    build,
    lib,
    status_string,
)
from services.transfer.native.memory import Pieces, Region, RemoteKey, copy_kv, pages_mapped, prefault, shared_mapping
from services.transfer.native.node import EVENT_MESSAGE, EVENT_PEER_FAILED, Connection, Lane, Node
from services.transfer.native.sink import EVENT_ACKS_DUE, EVENT_ROUTE_DONE, ROUTE_DONE, Sink

__all__ = [
    "EVENT_ACKS_DUE",
    "EVENT_MESSAGE",
    "EVENT_PEER_FAILED",
    "EVENT_ROUTE_DONE",
    "ROUTE_DONE",
    "UCS_ERR_INVALID_ADDR",
    "UCS_ERR_NOT_CONNECTED",
    "UCS_ERR_TIMED_OUT",
    "Connection",
    "Lane",
    "NativeError",
    "Node",
    "Pieces",
    "Region",
    "RemoteKey",
    "Sink",
    "build",
    "copy_kv",
    "lib",
    "pages_mapped",
    "prefault",
    "shared_mapping",
    "status_string",
]
