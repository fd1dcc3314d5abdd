"""A concurrent.futures.Future that other processes can complete, under both fork and spawn.

Design: the process that creates futures (the *origin*) lazily runs one listener thread on a local socket
(Linux abstract namespace, a temporary file elsewhere) protected by a random authkey. A future pickles as
(its class, origin pid, listener address, authkey, uid, shared slot, subclass state). In any other process,
requests that need the origin's decision (``set_running_or_notify_cancel``, ``cancel``) are a round trip over a
per-process cached connection, so the origin stays the single owner of the transitions. Cheaper paths:

- every future owns a 64-byte slot in a shared-memory segment of its origin; the origin mirrors the state there,
  so ``done()``, ``cancelled()`` and ``running()`` in another process are memory reads, and subclasses keep small
  shared fields in the slot (e.g. the weight and trigger of a ``StepControl``);
- ``set_result`` / ``set_exception`` from another process are one-way messages (no reply is awaited): a completion
  the shared state already shows as impossible raises ``InvalidStateError`` locally, as does a second completion
  from the same process.

Subclasses arrive as themselves on the other side, with the state returned by ``_extra_pickle_state``.
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
from hivemind.utils.shared_slots import SHARED_CELLS, Segment, SharedSlot, forget_segments_of, open_segment

__all__ = ["MPFuture", "InvalidStateError", "ALL_STATES", "SHARED_CELLS"]

logger = get_logger(__name__)

_PENDING, _RUNNING, _CANCELLED, _FINISHED = "PENDING", "RUNNING", "CANCELLED", "FINISHED"
_CANCELLED_STATES = ("CANCELLED", "CANCELLED_AND_NOTIFIED")
# every state name a future can be in, in the order hivemind 1.1 numbers them (code that stores a state as
# its index in this tuple, as petals does, gets the same numbers)
ALL_STATES = ("PENDING", "RUNNING", "FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED")
_OK = ("ok", None)


_STATE_CODES = {name: code for code, name in enumerate(ALL_STATES)}


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
        self.segments = []
        self.closed = False
        threading.Thread(target=self._accept_loop, name="MPFuture.listener", daemon=True).start()

    def register(self, future: MPFuture) -> Tuple[int, Optional[Tuple[Segment, int]]]:
        """Assign a uid and a shared slot (segment, index) to a new future of this process."""
        uid = next(self.uid_counter)
        self.futures[uid] = future
        with _state_lock:
            for segment in self.segments:
                slot = segment.allocate(uid)
                if slot is not None:
                    return uid, (segment, slot)
            try:
                segment = Segment()
            except OSError as e:  # e.g. out of file descriptors: the future still works, through round trips
                logger.debug(f"MPFuture: no shared slot ({e!r}), state is read through the origin")
                return uid, None
            self.segments.append(segment)
            return uid, (segment, segment.allocate(uid))

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
                want_reply = True
                try:
                    op, uid, payload, want_reply = pickle.loads(request)
                    reply = self._handle(op, uid, payload)
                except Exception as e:
                    logger.warning(f"MPFuture: malformed request from another process: {e!r}")
                    reply = ("error", f"malformed request: {e!r}")
                if not want_reply:
                    if reply[0] != "ok":
                        logger.debug(f"MPFuture: a one-way request from another process failed: {reply}")
                    continue
                try:
                    connection.send_bytes(pickle.dumps(reply))
                except (OSError, EOFError):
                    return

    def _handle(self, op: str, uid: int, payload: Optional[bytes]) -> Tuple[str, Any]:
        future = self.futures.get(uid)
        if future is None:  # the origin dropped every reference to it: nobody waits, treat as cancelled
            return ("ok", {"state": _CANCELLED, "running": False, "cancel": False}.get(op))
        if op == "state":
            return ("ok", future._state)
        if op == "running":
            try:
                return ("ok", future.set_running_or_notify_cancel())
            except RuntimeError as e:
                return ("runtime_error", str(e))
        if op == "cancel":
            return ("ok", future.cancel())
        if op in ("result", "exception"):
            try:
                value = ForkingPickler.loads(payload)
            except Exception as e:  # e.g. a class that exists in the sender but cannot be imported here
                value = RuntimeError(f"MPFuture could not unpickle the {op} sent by another process: {e!r}")
                op = "exception"
            try:
                if op == "result":
                    future.set_result(value)
                else:
                    future.set_exception(value)
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
        for segment in self.segments:
            segment.close()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)


class _Peer:
    """A cached connection from this process to another process's origin endpoint."""

    def __init__(self, address: str, authkey: bytes, origin_pid: int):
        self.connection = Client(address, family="AF_UNIX", authkey=authkey)
        self.lock = threading.Lock()
        self.origin_pid = origin_pid

    def request(self, op: str, uid: int, payload: Optional[bytes] = None) -> Tuple[str, Any]:
        message = pickle.dumps((op, uid, payload, True))
        with self.lock:
            self.connection.send_bytes(message)
            return pickle.loads(self.connection.recv_bytes())

    def notify(self, op: str, uid: int, payload: Optional[bytes] = None) -> None:
        """Send a request without waiting for its outcome (the origin sends no reply)."""
        message = pickle.dumps((op, uid, payload, False))
        with self.lock:
            self.connection.send_bytes(message)


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


def _get_peer(address: str, authkey: bytes, origin_pid: int) -> _Peer:
    peer = _peers.get(address)
    if peer is None:
        with _state_lock:
            peer = _peers.get(address)
            if peer is None:
                peer = _peers[address] = _Peer(address, authkey, origin_pid)
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
    # (mapped segments stay: the mappings are shared with the parent and remain valid)
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
    A subclass arrives as the same subclass; it can keep up to ``SHARED_CELLS`` numbers in shared memory through
    ``self._shared`` (a SharedSlot) and send further picklable state by overriding ``_extra_pickle_state`` and
    ``_restore_extra_state``.

    :param use_lock: accepted for compatibility; every state transition is already atomic.
    """

    def __init__(self, *, use_lock: bool = True):
        super().__init__()
        origin = _get_origin()
        self._origin_pid = origin.pid
        self._address, self._authkey = origin.address, origin.authkey
        self._is_proxy = False
        self._completed_here = False
        self._uid, placement = origin.register(self)
        self._shared: Optional[SharedSlot] = None
        self._segment_path: Optional[str] = None
        self._slot_index = -1
        if placement is not None:
            segment, self._slot_index = placement
            self._segment_path = segment.path
            self._shared = SharedSlot(segment.mapping, self._slot_index, self._uid)
            weakref.finalize(self, segment.release, self._slot_index, origin.pid)

    @classmethod
    def reset_backend(cls) -> None:
        """Close this process's cached connections to other processes' futures (they reopen when needed), e.g. to
        clean up between test modules; existing futures keep working."""
        for address in list(_peers):
            _drop_peer(address)

    @classmethod
    def forget_process(cls, pid: Optional[int]) -> None:
        """Release what this process holds to reach the futures of process ``pid`` once it has exited (its cached
        connection and its shared-memory mappings, a descriptor each): call it when a child that sent futures here
        is gone. Its futures still held here behave as for any exited origin."""
        if pid is None:  # (a process that never started sent nothing)
            return
        with _state_lock:
            addresses = [address for address, peer in _peers.items() if peer.origin_pid == pid]
        for address in addresses:
            _drop_peer(address)
        forget_segments_of(pid)

    @classmethod
    def _make_proxy(
        cls, origin_pid: int, address: str, authkey: bytes, uid: int, segment_path: Optional[str], slot_index: int
    ) -> MPFuture:
        if os.getpid() == origin_pid and _origin is not None and _origin.address == address:
            future = _origin.futures.get(uid)
            if future is not None:
                return future  # unpickled back in its origin process: the very same object
        proxy = cls.__new__(cls)
        concurrent.futures.Future.__init__(proxy)
        proxy._origin_pid, proxy._address, proxy._authkey, proxy._uid = origin_pid, address, authkey, uid
        proxy._is_proxy, proxy._completed_here = True, False
        proxy._segment_path, proxy._slot_index, proxy._shared = segment_path, slot_index, None
        mapping = open_segment(segment_path, origin_pid) if segment_path is not None else None
        if mapping is not None:
            proxy._shared = SharedSlot(mapping, slot_index, uid)
        return proxy

    def __reduce__(self):
        location = (self._origin_pid, self._address, self._authkey, self._uid, self._segment_path, self._slot_index)
        return _restore_mpfuture, (type(self), location, self._extra_pickle_state())

    def _extra_pickle_state(self) -> Any:
        """Picklable state a subclass sends along with the future (restored by ``_restore_extra_state``)."""
        return None

    def _restore_extra_state(self, state: Any) -> None:
        pass

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
            status, value = _get_peer(self._address, self._authkey, self._origin_pid).request(op, self._uid, payload)
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

    def _notify(self, op: str, payload: bytes) -> None:
        """Complete the future in its origin without waiting (see the module docstring)."""
        state = self._remote_state()
        if self._completed_here or state in (_FINISHED, *_CANCELLED_STATES):
            raise InvalidStateError(f"{state}: {self!r}")
        self._completed_here = True
        try:
            _get_peer(self._address, self._authkey, self._origin_pid).notify(op, self._uid, payload)
        except (OSError, EOFError) as e:
            _drop_peer(self._address)
            logger.debug(f"MPFuture: origin process {self._origin_pid} is unreachable ({e!r}), {op} ignored")

    def _remote_state(self) -> str:
        if self._shared is not None:
            if not self._shared.alive:
                return _CANCELLED  # dropped by its origin: nobody waits for it
            return ALL_STATES[self._shared.get_state_code()]
        return self._request("state", default=_CANCELLED)

    def _mirror_state(self) -> None:
        """Publish the current state to the shared slot (origin only, after every transition)."""
        if self._shared is not None:
            with self._condition:
                self._shared.set_state_code(_STATE_CODES[self._state])

    # completion: allowed from any process

    def set_result(self, result: Any) -> None:
        if self._in_origin:
            super().set_result(result)
            return self._mirror_state()
        self._notify("result", bytes(ForkingPickler.dumps(result)))

    def set_exception(self, exception: Optional[BaseException]) -> None:
        if self._in_origin:
            super().set_exception(exception)
            return self._mirror_state()
        try:
            payload = bytes(ForkingPickler.dumps(exception))
        except Exception as e:
            logger.debug(f"MPFuture: exception {exception!r} is not picklable ({e!r}), sending its text instead")
            payload = bytes(ForkingPickler.dumps(RuntimeError(f"{type(exception).__name__}: {exception}")))
        self._notify("exception", payload)

    def set_running_or_notify_cancel(self) -> bool:
        if self._in_origin:
            try:
                return super().set_running_or_notify_cancel()
            finally:
                self._mirror_state()
        return self._request("running", default=False)

    def cancel(self) -> bool:
        if self._in_origin:
            try:
                return super().cancel()
            finally:
                self._mirror_state()
        return self._request("cancel", default=False)

    # inspection: allowed from any process (a shared-memory read when called elsewhere)

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
        return self._completed_here or self._remote_state() in (*_CANCELLED_STATES, _FINISHED)

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


def _restore_mpfuture(cls: type, location: tuple, extra_state: Any) -> MPFuture:
    if not (isinstance(cls, type) and issubclass(cls, MPFuture)):
        raise TypeError(f"expected an MPFuture subclass, got {cls!r}")
    future = cls._make_proxy(*location)
    if future._is_proxy:
        future._restore_extra_state(extra_state)
    return future
