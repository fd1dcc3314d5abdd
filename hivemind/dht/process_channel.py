"""
The request/response channel between a user process and the DHT process: one duplex pipe, no polling.

The user side sends ``(call_id, pickled (method, args, kwargs))`` from any thread and a single reader thread resolves
the matching futures; the DHT side reads requests from its event loop (``loop.add_reader``) and answers with
``(call_id, ok, result_or_exception)``. The request body is pickled separately so that a request the DHT process
cannot load (e.g. a function defined after it was forked) is answered with an error instead of never. A closed pipe
fails every pending call instead of hanging it.
"""

import asyncio
import concurrent.futures
import itertools
import os
import queue
import threading
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import ForkingPickler
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from hivemind.utils.futures import complete, fail
from hivemind.utils.logging import get_logger
from hivemind.utils.process_handle import how_it_ended, peek_exitcode

logger = get_logger(__name__)

CANCEL = "__cancel__"  # method name of a request that cancels the pending call whose id is args[0]
READY_CALL_ID = 0  # the DHT side answers this id once, when it is ready or failed to start


class ChannelClosedError(RuntimeError):
    """The DHT process exited (or closed its end of the pipe) before answering."""


class NestedCallError(RuntimeError):
    """A call made by a signal handler that interrupted its own thread's send of another call (it cannot be sent)."""


def exitcode_of(process) -> Callable[[], Optional[int]]:
    """
    Returns a function that tells the exit code of ``process`` (negative: the signal that killed it), or None while it
    runs or when it cannot be told, without keeping the process object alive.

    The function never reaps the process (``peek_exitcode``): the reader thread calls it when the pipe closes, while
    the user's thread may be in ``join()``.
    """
    process_ref = weakref.ref(process)
    return lambda: peek_exitcode(process_ref())


class CallerEnd:
    """The user-process end: ``call`` returns a future resolved by the reader thread when the answer arrives."""

    def __init__(
        self, connection: Connection, process_name: str = "DHT", exitcode: Optional[Callable[[], Optional[int]]] = None
    ):
        self._connection, self._process_name, self._exitcode = connection, process_name, exitcode
        # reentrant, with a count of sends in progress: a signal handler that makes a call while its own thread is
        # sending one would otherwise wait forever for the lock its interrupted thread holds (see _send)
        self._send_lock = threading.RLock()
        self._sends_in_progress = 0
        self._pending: Dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count(READY_CALL_ID + 1)
        self._closed_error: Optional[BaseException] = None
        self._reader: Optional[threading.Thread] = None
        self.ready = concurrent.futures.Future()
        self._pending[READY_CALL_ID] = self.ready

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read_forever, name=f"{self._process_name}.responses", daemon=True)
        self._reader.start()

    def call(self, future: concurrent.futures.Future, method: str, *args, **kwargs) -> concurrent.futures.Future:
        """Send one request; ``future`` (a Future or MPFuture) gets its result. Cancelling it cancels the call."""
        call_id = next(self._call_ids)
        self._pending[call_id] = future
        if self._closed_error is not None:
            if self._pending.pop(call_id, None) is not None:  # (else the reader thread failed it just now)
                closed = ChannelClosedError(
                    f"the {self._process_name} process is not running: {self._why(self._closed_error)}"
                )
                fail(future, closed)
            return future
        try:
            body = bytes(ForkingPickler.dumps((method, args, kwargs)))
            self._send((call_id, body), method)
        except Exception as e:
            # the reader thread may have failed it meanwhile: the pipe broke because the other process ended
            if self._pending.pop(call_id, None) is not None:
                closed = ChannelClosedError(f"the {self._process_name} process is not running: {self._why(e)}")
                fail(future, e if not isinstance(e, (OSError, EOFError)) else closed)
            return future
        future.add_done_callback(lambda f: self._on_done(call_id, f))
        return future

    def _on_done(self, call_id: int, future: concurrent.futures.Future) -> None:
        if future.cancelled() and self._pending.pop(call_id, None) is not None:
            try:
                self._send((0, bytes(ForkingPickler.dumps((CANCEL, (call_id,), {})))), CANCEL)
            except Exception:
                pass  # the DHT process is gone: nothing left to cancel

    def _send(self, message: Tuple[int, bytes], method: str) -> None:
        with self._send_lock:
            if self._sends_in_progress:
                # only this thread can hold the lock here, so it is in the middle of sending another request, i.e.
                # a signal handler runs on top of that send: a second message would be written into the first one
                raise NestedCallError(
                    f"{method}() was called while this thread was sending another request to the "
                    f"{self._process_name} process (from a signal handler that interrupted it): the call could never "
                    f"be sent. Make the call after the handler returns (e.g. let the handler set a flag that your "
                    f"code checks) or from another thread"
                )
            self._sends_in_progress += 1
            try:
                self._connection.send(message)
            finally:
                self._sends_in_progress -= 1

    def _read_forever(self) -> None:
        try:
            while True:
                self._deliver(*self._connection.recv())
        except (EOFError, OSError) as e:
            self.fail_pending(e)
        except BaseException as e:  # e.g. an unpicklable result: fail everything rather than hang
            logger.exception(f"{self._process_name} response reader crashed")
            self.fail_pending(e)

    def _why(self, reason: BaseException) -> str:
        """How the other process ended (exit code or signal when known) and what to do about it."""
        try:
            code = self._exitcode() if self._exitcode is not None else None
        except Exception:  # e.g. asked from a process that is not the parent
            code = None
        how = "it exited or closed its end of the pipe" if code is None else f"it {how_it_ended(code)}"
        detail = f" ({reason})" if str(reason) else ""
        return f"{how}{detail}; this {self._process_name} cannot be used any more: create a new {self._process_name}"

    def _deliver(self, call_id: int, ok: bool, payload: Any) -> None:
        """Resolve the future of ``call_id``. A function of its own so that the reader thread keeps no reference
        to the answer while it waits for the next one (e.g. a whole downloaded state)."""
        future = self._pending.pop(call_id, None)
        if future is None:
            return
        if ok:  # (complete and fail leave a future that the user cancelled meanwhile as it is)
            complete(future, payload)
        else:
            fail(future, payload)

    def fail_pending(self, reason: BaseException) -> None:
        self._closed_error = reason
        why = self._why(reason)
        while True:  # (the reader thread and shutdown() may both run this: each call goes to one of them)
            try:
                _, future = self._pending.popitem()
            except KeyError:
                return
            fail(future, ChannelClosedError(f"the {self._process_name} process ended before answering: {why}"))

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
        # answers are written by a thread: a large one must not block the event loop, and an event loop may have made
        # the socket non-blocking (uvloop does in add_reader), where a plain send stops half-way with EAGAIN
        self._outgoing: queue.SimpleQueue[Optional[bytes]] = queue.SimpleQueue()
        self._writer: Optional[threading.Thread] = None

    def send(self, call_id: int, ok: bool, payload: Any) -> None:
        try:
            message = ForkingPickler.dumps((call_id, ok, payload))
        except Exception as e:  # the result could not be pickled: report that instead
            error = TypeError(f"DHT call result could not be sent back: {e!r}")
            message = ForkingPickler.dumps((call_id, False, error))
        if self._writer is None:  # answers may be sent before start(), e.g. a failed start
            self._writer = threading.Thread(target=self._write_forever, name="DHT.answers", daemon=True)
            self._writer.start()
        self._outgoing.put(bytes(message))

    def _write_forever(self) -> None:
        while True:
            message = self._outgoing.get()
            if message is None:
                return
            try:
                self._connection.send_bytes(message)
            except (OSError, EOFError, ValueError):
                return  # the user process is gone (or the connection was closed): nobody is left to answer
            del message  # not kept while waiting for the next answer

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._connection.fileno(), self._on_readable)
        os.set_blocking(self._connection.fileno(), True)  # reads are polled first; writes block in the writer thread

    def stop(self, flush_timeout: float = 10.0) -> None:
        """Stop reading requests, cancel running calls, and send the answers already queued (bounded wait)."""
        if self._loop is not None and not self._connection.closed:
            self._loop.remove_reader(self._connection.fileno())
        for task in self._tasks.values():
            task.cancel()
        if self._writer is not None:
            self._outgoing.put(None)
            self._writer.join(flush_timeout)
            if self._writer.is_alive():
                logger.warning(f"DHT answers were not all delivered within {flush_timeout} s of shutdown")

    def close(self) -> None:
        try:
            self._connection.close()
        except OSError:
            pass

    def _on_readable(self) -> None:
        try:
            while self._connection.poll():
                call_id, body = self._connection.recv()
                try:
                    method, args, kwargs = ForkingPickler.loads(body)
                    self._dispatch(call_id, method, args, kwargs)
                except Exception as e:
                    message = f"the DHT process could not run this request: {e!r}"
                    self.send(call_id, False, RuntimeError(message))
        except (EOFError, OSError):
            if not self._connection.closed:
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


class SocketAcceptor:
    """
    Lets processes other than the DHT's creator (forked or spawned workers holding a copy of the DHT object) call the
    DHT: each connects once to a Unix socket (authenticated with ``authkey``) and gets its own ServingEnd.
    Connections are accepted in a thread, so a slow or hostile client never blocks the event loop.
    """

    def __init__(self, address: str, authkey: bytes, handlers: Dict[str, Handler]):
        self.address, self._authkey, self._handlers = address, authkey, handlers
        self._listener: Optional[Listener] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ends: Dict[int, ServingEnd] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self._authkey)
        threading.Thread(target=self._accept_forever, name="DHT.accept", daemon=True).start()

    def _accept_forever(self) -> None:
        listener = self._listener
        while True:
            try:
                connection = listener.accept()
            except (AuthenticationError, EOFError, ConnectionError) as e:
                logger.debug(f"Refused a connection to the DHT process: {e!r}")
                continue
            except OSError:
                return  # the listener was closed
            try:
                self._loop.call_soon_threadsafe(self._serve, connection)
            except RuntimeError:
                connection.close()  # the event loop is closed
                return

    def _serve(self, connection: Connection) -> None:
        key = id(connection)
        end = ServingEnd(connection, self._handlers, on_closed=lambda: self._drop(key))
        self._ends[key] = end
        end.start(self._loop)

    def _drop(self, key: int) -> None:
        end = self._ends.pop(key, None)
        if end is not None:
            end.stop()
            end.close()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # also removes the socket file
        for key in list(self._ends):
            self._drop(key)


def connect_to_dht_process(address: str, authkey: bytes) -> CallerEnd:
    """A CallerEnd for the calling process over the DHT process's Unix socket (see SocketAcceptor)."""
    try:
        connection = Client(address, family="AF_UNIX", authkey=authkey)
    except (FileNotFoundError, ConnectionRefusedError) as e:  # its socket is gone or nobody listens on it any more
        raise ChannelClosedError(
            f"the DHT process is not running: it was shut down or has exited ({e.strerror}); "
            f"this DHT cannot be used any more: create a new DHT"
        ) from None
    caller = CallerEnd(connection)
    caller.ready.set_result(None)
    caller.start_reader()
    return caller
