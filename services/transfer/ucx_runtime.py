"""The process-wide ucxx context: created on first use, shared by every sender and receiver.

Progress mode (why "thread" with Python futures): ucxx runs a C++ progress thread and a notifier
thread that completes each request's asyncio future on the event loop that was running when UCX
was initialised. Nothing busy-polls the loop, so the loop stays free for other work and a worker
thread can hand it coroutines with `asyncio.run_coroutine_threadsafe(sender.send(...), loop)`
while it computes the next layer (the send then overlaps the compute). The other modes either
spin the loop with `asyncio.sleep(0)` ("polling", and ucxx's default without futures, which
starves other threads of the GIL) or progress only on epoll events ("blocking", several times slower when measured here).

All users must therefore run on one event loop per process. `acquire()` checks that; `release()`
tears UCX down when the last user leaves, so a later user may start over on another loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from types import ModuleType

from services.transfer.config import TransferConfig

log = logging.getLogger(__name__)

_lock = threading.Lock()
_users = 0
_loop: asyncio.AbstractEventLoop | None = None
_env: dict[str, str] | None = None


def acquire(config: TransferConfig) -> ModuleType:
    """Initialise UCX on the running loop if needed and return the `ucxx` module. Pair with `release()`."""
    global _users, _loop, _env
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

        if _users == 0:
            try:
                ucxx.init(progress_mode="thread", enable_python_future=True)
            except RuntimeError:  # a previous reset() failed: reuse that context, notify on this loop
                ucxx.core._get_ctx().start_notifier_thread()
            _loop = loop
        _users += 1
        return ucxx


def release() -> None:
    """Drop one user; the last one shuts UCX down (its threads would otherwise keep the process alive)."""
    global _users, _loop
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users > 0:
            return
        _loop = None
        import ucxx

        gc.collect()
        try:
            ucxx.reset()
        except Exception as exc:  # objects still referenced somewhere: at least stop the notifier thread
            log.debug("ucxx.reset() failed (%s); stopping the notifier thread only", exc)
            ucxx.stop_notifier_thread()
