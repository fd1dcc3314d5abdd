"""A concurrent.futures.Future that other processes can complete (API.md §9), under both fork and spawn.

Design: the process that creates futures (the *origin*) lazily runs one listener thread on a local socket
(Linux abstract namespace, a temporary file elsewhere) protected by a random authkey. A future pickles as
(origin pid, listener address, authkey, uid). In any other process, calls such as ``set_result`` or
``set_running_or_notify_cancel`` send a request over a per-process cached connection and wait for the origin's
reply, so the origin is the single owner of the state: transitions are atomic, a worker sees the origin's
cancellation, and double completion raises ``InvalidStateError`` wherever it happens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing.util
import os
import pickle
import shutil
import sys
import tempfile
import threading
import weakref
from concurrent.futures import InvalidStateError
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Dict, Optional, Tuple

from hivemind.utils.logging import get_logger

__all__ = ["MPFuture", "InvalidStateError", "ALL_STATES"]

logger = get_logger(__name__)

_PENDING, _RUNNING, _CANCELLED, _FINISHED = "PENDING", "RUNNING", "CANCELLED", "FINISHED"
_CANCELLED_STATES = ("CANCELLED", "CANCELLED_AND_NOTIFIED")
# every state name a future can be in, in the order hivemind 1.1 numbers them (code that stores a state as
# its index in this tuple, as petals does, gets the same numbers)
ALL_STATES = ("PENDING", "RUNNING", "FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED")
_OK = ("ok", None)


class _Origin:
    """Per-process endpoint that owns the futures created in this process and serves requests about them."""

    def __init__(self):
        self.pid = os.getpid()
        self.authkey = os.urandom(32)
        self._tempdir = None
        if sys.platform.startswith("linux"):
            self.address = f"\0hivemind-mpfuture-{self.pid}-{os.urandom(8).hex()}"
        else:
            self._tempdir = tempfile.mkdtemp(prefix="hivemind-mpf-")
            self.address = os.path.join(self._tempdir, "futures.sock")
        self.listener = Listener(self.address, family="AF_UNIX", backlog=128, authkey=self.authkey)
        self.futures: weakref.WeakValueDictionary[int, MPFuture] = weakref.WeakValueDictionary()
        self.uid_counter = itertools.count()
        self.closed = False
        threading.Thread(target=self._accept_loop, name="MPFuture.listener", daemon=True).start()

    def register(self, future: MPFuture) -> int:
        uid = next(self.uid_counter)
        self.futures[uid] = future
        return uid

    def _accept_loop(self):
        while not self.closed:
            try:
                connection = self.listener.accept()
            except (OSError, EOFError) as e:  # includes AuthenticationError from a foreign client
                if self.closed:
                    return
                logger.debug(f"MPFuture listener rejected a connection: {e!r}")
                continue
            threading.Thread(target=self._serve, args=(connection,), name="MPFuture.connection", daemon=True).start()

    def _serve(self, connection: Connection):
        with connection:
            while True:
                try:
                    request = connection.recv_bytes()
                except (EOFError, OSError):
                    return  # the other process closed the connection or exited
                try:
                    op, uid, payload = pickle.loads(request)
                    reply = self._handle(op, uid, payload)
                except Exception as e:
                    logger.warning(f"MPFuture: malformed request from another process: {e!r}")
                    reply = ("error", f"malformed request: {e!r}")
                try:
                    connection.send_bytes(pickle.dumps(reply))
                except (OSError, EOFError):
                    return

    def _handle(self, op: str, uid: int, payload: Optional[bytes]) -> Tuple[str, Any]:
        future = self.futures.get(uid)
        if future is None:  # the origin dropped every reference to it: nobody waits, treat as cancelled
            return ("ok", {"state": _CANCELLED, "running": False, "cancel": False}.get(op))
        base = concurrent.futures.Future
        if op == "state":
            return ("ok", future._state)
        if op == "running":
            try:
                return ("ok", base.set_running_or_notify_cancel(future))
            except RuntimeError as e:
                return ("runtime_error", str(e))
        if op == "cancel":
            return ("ok", base.cancel(future))
        if op in ("result", "exception"):
            try:
                value = ForkingPickler.loads(payload)
            except Exception as e:  # e.g. a class that exists in the sender but cannot be imported here
                value = RuntimeError(f"MPFuture could not unpickle the {op} sent by another process: {e!r}")
                op = "exception"
            try:
                if op == "result":
                    base.set_result(future, value)
                else:
                    base.set_exception(future, value)
            except InvalidStateError as e:
                return ("invalid_state", str(e))
            return _OK
        return ("error", f"unknown operation {op!r}")

    def close(self):
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)


class _Peer:
    """A cached connection from this process to another process's origin endpoint."""

    def __init__(self, address: str, authkey: bytes):
        self.connection = Client(address, family="AF_UNIX", authkey=authkey)
        self.lock = threading.Lock()

    def request(self, op: str, uid: int, payload: Optional[bytes] = None) -> Tuple[str, Any]:
        message = pickle.dumps((op, uid, payload))
        with self.lock:
            self.connection.send_bytes(message)
            return pickle.loads(self.connection.recv_bytes())


_state_lock = threading.Lock()
_origin: Optional[_Origin] = None
_peers: Dict[str, _Peer] = {}


def _get_origin() -> _Origin:
    global _origin
    if _origin is None or _origin.pid != os.getpid():
        with _state_lock:
            if _origin is None or _origin.pid != os.getpid():
                _origin = _Origin()
                # runs at interpreter exit and at the end of multiprocessing children (where atexit does not)
                multiprocessing.util.Finalize(None, _origin.close, exitpriority=10)
    return _origin


def _get_peer(address: str, authkey: bytes) -> _Peer:
    peer = _peers.get(address)
    if peer is None:
        with _state_lock:
            peer = _peers.get(address)
            if peer is None:
                peer = _peers[address] = _Peer(address, authkey)
    return peer


def _drop_peer(address: str) -> None:
    with _state_lock:
        peer = _peers.pop(address, None)
    if peer is not None:
        try:
            peer.connection.close()
        except OSError:
            pass


def _reset_after_fork() -> None:
    # the child must not serve the parent's futures nor share its sockets; inherited objects are simply dropped
    global _state_lock, _origin, _peers
    _state_lock = threading.Lock()
    _origin = None
    _peers = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class MPFuture(concurrent.futures.Future):
    """A future that can be completed, cancelled or inspected from other processes; only the creating process may
    wait for it (``result()``, ``exception()``, ``add_done_callback()``, ``await future``).

    Pass it to another process by pickling (``multiprocessing`` with spawn or fork, queues, pipes) or by forking.
    :param use_lock: accepted for compatibility; every state transition is already atomic.
    """

    def __init__(self, *, use_lock: bool = True):
        super().__init__()
        origin = _get_origin()
        self._origin_pid = origin.pid
        self._address, self._authkey = origin.address, origin.authkey
        self._is_proxy = False
        self._uid = origin.register(self)

    @classmethod
    def _make_proxy(cls, origin_pid: int, address: str, authkey: bytes, uid: int) -> MPFuture:
        if os.getpid() == origin_pid and _origin is not None and _origin.address == address:
            future = _origin.futures.get(uid)
            if future is not None:
                return future  # unpickled back in its origin process: the very same object
        proxy = cls.__new__(cls)
        concurrent.futures.Future.__init__(proxy)
        proxy._origin_pid, proxy._address, proxy._authkey, proxy._uid = origin_pid, address, authkey, uid
        proxy._is_proxy = True
        return proxy

    def __reduce__(self):
        return _restore_mpfuture, (self._origin_pid, self._address, self._authkey, self._uid)

    @property
    def _in_origin(self) -> bool:
        return not self._is_proxy and self._origin_pid == os.getpid()

    def _check_origin(self, method: str) -> None:
        if not self._in_origin:
            raise RuntimeError(
                f"MPFuture.{method}() may only be called in the process that created the future "
                f"(pid {self._origin_pid}), not in pid {os.getpid()}"
            )

    def _request(self, op: str, payload: Optional[bytes] = None, *, default: Any = None) -> Any:
        """Ask the origin process to perform ``op``; returns ``default`` if the origin is gone."""
        try:
            status, value = _get_peer(self._address, self._authkey).request(op, self._uid, payload)
        except (OSError, EOFError) as e:  # the origin process exited: nobody can observe this future any more
            _drop_peer(self._address)
            logger.debug(f"MPFuture: origin process {self._origin_pid} is unreachable ({e!r}), {op} ignored")
            return default
        if status == "ok":
            return value
        if status == "invalid_state":
            raise InvalidStateError(value)
        if status == "runtime_error":
            raise RuntimeError(value)
        raise RuntimeError(f"MPFuture: origin process {self._origin_pid} refused {op}: {value}")

    def _remote_state(self) -> str:
        return self._request("state", default=_CANCELLED)

    # completion: allowed from any process

    def set_result(self, result: Any) -> None:
        if self._in_origin:
            return super().set_result(result)
        self._request("result", bytes(ForkingPickler.dumps(result)))

    def set_exception(self, exception: Optional[BaseException]) -> None:
        if self._in_origin:
            return super().set_exception(exception)
        try:
            payload = bytes(ForkingPickler.dumps(exception))
        except Exception as e:
            logger.debug(f"MPFuture: exception {exception!r} is not picklable ({e!r}), sending its text instead")
            payload = bytes(ForkingPickler.dumps(RuntimeError(f"{type(exception).__name__}: {exception}")))
        self._request("exception", payload)

    def set_running_or_notify_cancel(self) -> bool:
        if self._in_origin:
            return super().set_running_or_notify_cancel()
        return self._request("running", default=False)

    def cancel(self) -> bool:
        if self._in_origin:
            return super().cancel()
        return self._request("cancel", default=False)

    # inspection: allowed from any process (a round trip to the origin when called elsewhere)

    def cancelled(self) -> bool:
        if self._in_origin:
            return super().cancelled()
        return self._remote_state() in _CANCELLED_STATES

    def running(self) -> bool:
        if self._in_origin:
            return super().running()
        return self._remote_state() == _RUNNING

    def done(self) -> bool:
        if self._in_origin:
            return super().done()
        return self._remote_state() in (*_CANCELLED_STATES, _FINISHED)

    # waiting: origin process only

    def result(self, timeout: Optional[float] = None) -> Any:
        self._check_origin("result")
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._check_origin("exception")
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[MPFuture], None]) -> None:
        self._check_origin("add_done_callback")
        return super().add_done_callback(fn)

    def __await__(self):
        self._check_origin("__await__")
        return asyncio.wrap_future(self).__await__()

    def __repr__(self):
        if self._in_origin:
            return super().__repr__()
        return f"<{self.__class__.__name__} at {id(self):#x} uid={self._uid} of pid {self._origin_pid}>"


def _restore_mpfuture(origin_pid: int, address: str, authkey: bytes, uid: int) -> MPFuture:
    return MPFuture._make_proxy(origin_pid, address, authkey, uid)
