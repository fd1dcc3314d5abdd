"""
The request/response channel between a user process and the DHT process: one duplex pipe, no polling.

The user side sends ``(call_id, method, args, kwargs)`` tuples from any thread and a single reader thread resolves the
matching futures; the DHT side reads requests from its event loop (``loop.add_reader``) and answers with
``(call_id, ok, result_or_exception)``. A closed pipe fails every pending call instead of hanging it.
"""

import asyncio
import concurrent.futures
import itertools
import threading
from multiprocessing.connection import Connection
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

CANCEL = "__cancel__"  # method name of a request that cancels the pending call whose id is args[0]
READY_CALL_ID = 0  # the DHT side answers this id once, when it is ready or failed to start


class ChannelClosedError(RuntimeError):
    """The DHT process exited (or closed its end of the pipe) before answering."""


class CallerEnd:
    """The user-process end: ``call`` returns a future resolved by the reader thread when the answer arrives."""

    def __init__(self, connection: Connection):
        self._connection = connection
        self._send_lock = threading.Lock()
        self._pending: Dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count(READY_CALL_ID + 1)
        self._closed_error: Optional[BaseException] = None
        self._reader: Optional[threading.Thread] = None
        self.ready = concurrent.futures.Future()
        self._pending[READY_CALL_ID] = self.ready

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read_forever, name="DHT.responses", daemon=True)
        self._reader.start()

    def call(self, future: concurrent.futures.Future, method: str, *args, **kwargs) -> concurrent.futures.Future:
        """Send one request; ``future`` (a Future or MPFuture) gets its result. Cancelling it cancels the call."""
        call_id = next(self._call_ids)
        self._pending[call_id] = future
        if self._closed_error is not None:
            self._pending.pop(call_id, None)
            future.set_exception(ChannelClosedError(f"the DHT process is not running: {self._closed_error}"))
            return future
        try:
            with self._send_lock:
                self._connection.send((call_id, method, args, kwargs))
        except Exception as e:
            self._pending.pop(call_id, None)
            future.set_exception(e if not isinstance(e, (OSError, EOFError)) else ChannelClosedError(repr(e)))
            return future
        future.add_done_callback(lambda f: self._on_done(call_id, f))
        return future

    def _on_done(self, call_id: int, future: concurrent.futures.Future) -> None:
        if future.cancelled() and self._pending.pop(call_id, None) is not None:
            try:
                with self._send_lock:
                    self._connection.send((0, CANCEL, (call_id,), {}))
            except Exception:
                pass  # the DHT process is gone: nothing left to cancel

    def _read_forever(self) -> None:
        try:
            while True:
                call_id, ok, payload = self._connection.recv()
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                try:
                    future.set_result(payload) if ok else future.set_exception(payload)
                except concurrent.futures.InvalidStateError:
                    pass  # cancelled concurrently by the user
        except (EOFError, OSError) as e:
            self.fail_pending(e)
        except BaseException as e:  # e.g. an unpicklable result: fail everything rather than hang
            logger.exception("DHT response reader crashed")
            self.fail_pending(e)

    def fail_pending(self, reason: BaseException) -> None:
        self._closed_error = reason
        while self._pending:
            _, future = self._pending.popitem()
            if not future.done():
                try:
                    future.set_exception(ChannelClosedError(f"the DHT process exited before answering ({reason!r})"))
                except concurrent.futures.InvalidStateError:
                    pass

    def close(self) -> None:
        try:
            self._connection.close()
        except OSError:
            pass


Handler = Callable[..., Awaitable[Any]]


class ServingEnd:
    """
    The DHT-process end: every request becomes a task running ``handlers[method](*args, **kwargs)`` on the event
    loop; the task is cancelled if the caller cancels its future. ``on_closed`` runs when the user side goes away.
    """

    def __init__(self, connection: Connection, handlers: Dict[str, Handler], on_closed: Callable[[], None]):
        self._connection, self._handlers, self._on_closed = connection, handlers, on_closed
        self._tasks: Dict[int, asyncio.Task] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def send(self, call_id: int, ok: bool, payload: Any) -> None:
        try:
            self._connection.send((call_id, ok, payload))
        except (OSError, EOFError):
            pass  # the user process is gone
        except Exception as e:  # the result could not be pickled: report that instead
            self._connection.send((call_id, False, TypeError(f"DHT call result could not be sent back: {e!r}")))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._connection.fileno(), self._on_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._connection.fileno())
        for task in self._tasks.values():
            task.cancel()

    def _on_readable(self) -> None:
        try:
            while self._connection.poll():
                call_id, method, args, kwargs = self._connection.recv()
                self._dispatch(call_id, method, args, kwargs)
        except (EOFError, OSError):
            self._loop.remove_reader(self._connection.fileno())
            self._on_closed()

    def _dispatch(self, call_id: int, method: str, args: Tuple, kwargs: Dict) -> None:
        if method == CANCEL:
            task = self._tasks.pop(args[0], None)
            if task is not None:
                task.cancel()
            return
        handler = self._handlers.get(method)
        if handler is None:
            self.send(call_id, False, AttributeError(f"the DHT process has no method {method!r}"))
            return
        task = self._loop.create_task(handler(*args, **kwargs))
        self._tasks[call_id] = task
        task.add_done_callback(lambda t: self._on_task_done(call_id, t))

    def _on_task_done(self, call_id: int, task: asyncio.Task) -> None:
        if self._tasks.pop(call_id, None) is None or task.cancelled():
            return  # cancelled by the caller, who already has its answer
        exception = task.exception()
        if exception is None:
            self.send(call_id, True, task.result())
        else:
            self.send(call_id, False, exception)
