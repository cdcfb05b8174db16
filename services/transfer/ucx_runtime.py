"""The process-wide ucxx context: created on first use, shared by every sender and receiver.

Progress mode (why "thread" with Python futures): ucxx runs a C++ progress thread and a notifier
thread that completes each request's asyncio future on the event loop that was running when UCX
was initialised. Nothing busy-polls the loop, so the loop stays free for other work and a worker
thread can hand it coroutines with `asyncio.run_coroutine_threadsafe(sender.send(...), loop)`
while it computes the next layer (the send then overlaps the compute). The other modes either
spin the loop with `asyncio.sleep(0)` ("polling", and ucxx's default without futures, which
starves other threads of the GIL and, on an oversubscribed host, the peer process too) or progress
only on epoll events ("blocking", several times slower when measured here).

All users must therefore run on one event loop at a time. `acquire()` checks that, and moves the
notifier to a new loop once every earlier user has released (e.g. two `asyncio.run` in a row).

The data path's own UCX worker (services/transfer/native) is process-wide too: `node()` returns
it, and its events reach the loop through one reader on its eventfd. Each connection end
subscribes a handler under a tag of its own (`subscribe`), which is what the peer's messages carry;
a handler gets, once per wake-up, every event that arrived for its tag, oldest first. While a
handler says more are due (a receiver whose request is mid-transfer), the loop keeps polling the
worker for up to `TransferConfig.spin_us` instead of sleeping, so that the next header needs no
wake-up on either side.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType

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


def acquire(config: TransferConfig) -> ModuleType:
    """Initialise UCX on the running loop if needed and return the `ucxx` module. Pair with `release()`."""
    global _users, _loop, _env, _spin_s
    loop = asyncio.get_running_loop()
    with _lock:
        if _users > 0 and _loop is not loop:
            raise RuntimeError(
                "UCX is already bound to another event loop in this process; every KVSender/KVReceiver "
                "of a process must live on the same event loop"
            )
        if _env is None:
            config.apply_ucx_env()
            _env = config.ucx_env()
        elif _env != config.ucx_env():
            log.warning("UCX already configured with %s; ignoring %s", _env, config.ucx_env())
        import ucxx

        global _node
        if _loop is None:
            ucxx.init(progress_mode=config.progress_mode, enable_python_future=True)
            _stop_at_exit(ucxx)
            _node = native.Node()
        elif _loop is not loop:
            # The notifier thread completes futures on the loop it was started with: move it.
            ucxx.stop_notifier_thread()
            ucxx.core._get_ctx().start_notifier_thread()
            ucxx.core._get_ctx().continuous_ucx_progress()
            assert _node is not None
            if not _loop.is_closed():
                _loop.remove_reader(_node.event_fd)
        if _loop is not loop:
            assert _node is not None
            loop.add_reader(_node.event_fd, _dispatch)
        _loop = loop
        _spin_s = config.spin_us * 1e-6  # a process-wide setting: the latest user's applies
        assert _node is not None
        _node.set_spin(_spin_s)
        _users += 1
        return ucxx


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


def _stop_at_exit(ucxx: ModuleType) -> None:
    # The notifier thread is not a daemon: stop it before the interpreter joins threads at exit,
    # which plain atexit handlers would be too late for.
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(ucxx.stop_notifier_thread)
