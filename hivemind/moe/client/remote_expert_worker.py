"""RemoteExpertWorker: one background event loop per process that runs the RPCs of remote experts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Awaitable, Optional, TypeVar, Union

__all__ = ["RemoteExpertWorker"]

T = TypeVar("T")


class RemoteExpertWorker:
    """Runs coroutines on an event loop that lives in a daemon thread of the calling process.

    Torch modules (RemoteExpert, RemoteMixtureOfExperts) are called from synchronous code; their network calls are
    sent here. The thread starts on first use. A forked child gets its own loop and thread on its first call (the
    parent's thread does not exist there).
    """

    _lock = threading.Lock()
    _loop: Optional[asyncio.AbstractEventLoop] = None
    _thread: Optional[threading.Thread] = None
    _pid: Optional[int] = None

    @classmethod
    def _get_loop(cls) -> asyncio.AbstractEventLoop:
        if cls._pid == os.getpid() and cls._loop is not None:
            return cls._loop
        with cls._lock:
            if cls._pid != os.getpid() or cls._loop is None:
                started = threading.Event()
                loop = asyncio.new_event_loop()

                def run_forever():
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=run_forever, name="RemoteExpertWorker", daemon=True)
                thread.start()
                started.wait()
                cls._loop, cls._thread, cls._pid = loop, thread, os.getpid()
        return cls._loop

    @classmethod
    def run_coroutine(cls, coro: Awaitable[T], return_future: bool = False) -> Union[T, concurrent.futures.Future]:
        """Run ``coro`` on the background loop; block for its result, or return a concurrent Future at once.

        Cancelling the returned future cancels the coroutine. Must not be called from the worker's own loop (it
        would wait for itself): await the coroutine there instead.
        """
        loop = cls._get_loop()
        if threading.current_thread() is cls._thread:
            raise RuntimeError("RemoteExpertWorker.run_coroutine was called from its own event loop; await instead")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        if return_future:
            return future
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the coroutine too
            raise


def _forget_parent_loop() -> None:
    # the parent's loop thread does not exist in a forked child: start a fresh one there on first use
    RemoteExpertWorker._lock = threading.Lock()
    RemoteExpertWorker._loop = RemoteExpertWorker._thread = RemoteExpertWorker._pid = None


os.register_at_fork(after_in_child=_forget_parent_loop)
