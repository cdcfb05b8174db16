"""The process-wide UCX worker of the data path (services/transfer/native): created on first use, shared by every
sender and receiver of the process.

Its events reach the event loop through one reader on its eventfd, so all users must run on one
event loop at a time. `acquire()` checks that, and moves the reader to a new loop once every
earlier user has released (e.g. two `asyncio.run` in a row). Each connection end subscribes a
handler under a tag of its own (`subscribe`), which is what the peer's messages carry; a handler
gets, once per wake-up, every event that arrived for its tag, oldest first. While a handler says
more are due (a receiver whose request is mid-transfer), the loop keeps polling the worker for up
to `TransferConfig.spin_us` instead of sleeping, so that the next header needs no wake-up on
either side.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable

from services.transfer import native
from services.transfer.config import TransferConfig
from services.transfer.ucx_formats import AddressShape, walk_address

log = logging.getLogger(__name__)

_lock = threading.Lock()
_users = 0
_loop: asyncio.AbstractEventLoop | None = None
_env: dict[str, str] | None = None
_node: native.Node | None = None
_own_shape: AddressShape | None = None
_spin_s = 0.0
SPIN_BUDGET_S = 0.002
_tags = itertools.count(1)

# Gets one wake-up's events for its tag; returns True when more are due in a moment (a request's
# layers are arriving), which keeps the loop polling for up to `spin_us` (see TransferConfig).
Handler = Callable[[list[tuple[int, int, bytes]]], bool | None]
_handlers: dict[int, Handler] = {}


def acquire(config: TransferConfig) -> native.Node:
    """Bring the data path's UCX worker up on the running loop if needed, and return it. Pair with `release()`."""
    global _users, _loop, _env, _spin_s, _node
    loop = asyncio.get_running_loop()
    with _lock:
        if _users > 0 and _loop is not loop:
            raise RuntimeError(
                "UCX is already bound to another event loop in this process; every KVSender/KVReceiver "
                "of a process must live on the same event loop"
            )
        if _env is None:
            _env = config.apply_ucx_env()
        elif _env != (wanted := config.ucx_env()):
            log.warning("UCX already configured with %s; ignoring %s", _env, wanted)
        if _node is None:
            _node = native.Node()
        if _loop is not loop:
            if _loop is not None and not _loop.is_closed():
                _loop.remove_reader(_node.event_fd)
            loop.add_reader(_node.event_fd, _dispatch)
        _loop = loop
        _spin_s = config.spin_us * 1e-6  # a process-wide setting: the latest user's applies
        _node.set_spin(_spin_s)
        _users += 1
        return _node


def node() -> native.Node:
    """The process's data-path worker (after `acquire()`)."""
    if _node is None:
        raise RuntimeError("ucx_runtime.acquire() must come first")
    return _node


def own_shape() -> AddressShape:
    """This process's data-path worker address, walked: what a peer's address is held against (ucx_formats)."""
    global _own_shape
    if _own_shape is None:
        _own_shape = walk_address(node().address)
    return _own_shape


def subscribe(handler: Handler) -> int:
    """A new tag whose events (kind, status, payload) go to `handler` on the loop."""
    tag = next(_tags)
    _handlers[tag] = handler
    return tag


def unsubscribe(tag: int) -> None:
    _handlers.pop(tag, None)


def _dispatch() -> None:
    """Hand every queued event to its handler; while one expects more soon, poll for them.

    Polling ends after SPIN_BUDGET_S per wake-up even if headers keep coming, so the loop's other
    callbacks still run; what arrives meanwhile wakes the loop again through the eventfd.
    """
    assert _node is not None
    spun = False
    until = time.monotonic() + SPIN_BUDGET_S
    try:
        while True:
            by_tag: dict[int, list[tuple[int, int, bytes]]] = {}
            for kind, status, tag, payload in _node.poll(woken=not spun):
                by_tag.setdefault(tag, []).append((kind, status, payload))
            more = False
            for tag, events in by_tag.items():
                handler = _handlers.get(tag)
                if handler is not None:
                    more = bool(handler(events)) or more
            if not (more and _spin_s) or time.monotonic() > until:
                return
            spun = True
            if not _node.spin(_spin_s):
                return
    finally:
        if spun:
            _node.spin_end()


def release() -> None:
    """Drop one user. UCX itself stays up for the life of the process (resetting it costs about 1 s)."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
