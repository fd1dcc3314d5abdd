"""Carrying TaskPool tasks between processes: a hub in the process that owns the pools, a client in every other.

Why not multiprocessing queues: they pickle tensors into shared-memory files (one file, mapping and unlink per
tensor) or copy them several times. Here a task travels over one authenticated local socket per pair of processes
(Linux abstract namespace, a temporary file elsewhere) as a small pickled header followed by the raw bytes of each
tensor, which the receiver reads straight into a freshly allocated tensor: one copy each way and no pickling of
tensor data. Results come back the same way on the same socket.

Messages (both directions): 4-byte little-endian header length, ``pickle(header)``, then the bytes of every tensor
listed in the header, in order. Headers: ``("task", pool_id, task_id, metas, owner)`` and ``("cancel", task_id)``
from a client; ``("result", task_id, metas)`` and ``("error", task_id, pickled_exception)`` from the hub, where
``metas`` is a list of ``(dtype name, shape)`` and ``owner`` who the task is for (see task_pool_queue.py). Only
processes that were given a pool (by fork or by pickling) know the random key that the hub asks for before it reads
anything else.

Each connection has its own reader and sender thread on both sides, so neither the runtime nor an event loop ever
blocks on a socket. A client that disconnects has its waiting tasks cancelled (the pool drops them); a hub that goes
away fails every task of that client with an error saying so.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import hmac
import itertools
import os
import pickle
import queue
import shutil
import socket
import struct
import sys
import tempfile
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hivemind.utils.logging import get_logger

__all__ = ["PoolEndpoint", "register_pool", "unregister_pool", "get_local_pool", "submit_remote_task"]

logger = get_logger(__name__)

PoolEndpoint = Tuple[str, bytes, int, int]  # (socket address, key, pool id, owner pid)

_HEADER_LENGTH = struct.Struct("<I")
_MAX_HEADER_BYTES = 1 << 20  # a header lists a few tensors; anything larger is a broken peer
_CONNECT_TIMEOUT = 10.0  # seconds to connect and authenticate to a hub
_KEY_BYTES = 32
_SOCKET_BUFFER_BYTES = 4 << 20  # fewer wake-ups per large tensor (the kernel caps it at net.core.[rw]mem_max)


def _enlarge_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def _dtype_from_name(name: str) -> torch.dtype:
    value = getattr(torch, name.rpartition(".")[2], None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return value


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _prepare(tensors: Sequence[torch.Tensor]) -> Tuple[List[Tuple[str, Tuple[int, ...]]], List[torch.Tensor]]:
    prepared = [tensor.detach().cpu().contiguous() for tensor in tensors]
    return [(str(tensor.dtype), tuple(tensor.shape)) for tensor in prepared], prepared


def _send_message(sock: socket.socket, header: tuple, tensors: Sequence[torch.Tensor] = ()) -> None:
    header_bytes = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER_LENGTH.pack(len(header_bytes)) + header_bytes)
    for tensor in tensors:
        if tensor.numel() > 0:
            sock.sendall(_raw_bytes(tensor))


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:], len(view) - received)
        if count == 0:
            raise EOFError("the other process closed the connection")
        received += count


def _recv_tensors(sock: socket.socket, metas: Any) -> List[torch.Tensor]:
    tensors = []
    for dtype_name, shape in metas:
        tensor = torch.empty(tuple(shape), dtype=_dtype_from_name(dtype_name))
        if tensor.numel() > 0:
            _recv_exact_into(sock, _raw_bytes(tensor))
        tensors.append(tensor)
    return tensors


def _recv_header(sock: socket.socket) -> tuple:
    length_bytes = bytearray(_HEADER_LENGTH.size)
    _recv_exact_into(sock, memoryview(length_bytes))
    (length,) = _HEADER_LENGTH.unpack(length_bytes)
    if length > _MAX_HEADER_BYTES:
        raise ValueError(f"message header of {length} bytes is over the limit of {_MAX_HEADER_BYTES}")
    header_bytes = bytearray(length)
    _recv_exact_into(sock, memoryview(header_bytes))
    header = pickle.loads(header_bytes)
    if not isinstance(header, tuple) or not header:
        raise ValueError(f"malformed message header {header!r}")
    return header


class _Sender:
    """A thread that writes queued messages to a socket, so that callers never block on it."""

    def __init__(self, sock: socket.socket, name: str, on_error):
        self.sock, self.on_error = sock, on_error
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, header: tuple, tensors: Sequence[torch.Tensor] = ()) -> None:
        self.queue.put((header, tensors))

    def close(self) -> None:
        self.queue.put(None)

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            header, tensors = item
            try:
                _send_message(self.sock, header, tensors)
            except (OSError, ValueError, pickle.PicklingError) as e:
                self.on_error(e)
                return


# ----------------------------------------------------------------------------------------------- owner side


class _RemoteTaskFuture(concurrent.futures.Future):
    """The owner-side stand-in for a task submitted by another process: completing it sends the answer back."""

    def __init__(self, channel: _HubChannel, task_id: int):
        super().__init__()
        self.channel, self.task_id = channel, task_id
        self.add_done_callback(self._reply)

    def _reply(self, future: concurrent.futures.Future) -> None:
        self.channel.futures.pop(self.task_id, None)
        if future.cancelled():
            return  # the submitter cancelled it (or went away): nobody waits for an answer
        exception = future.exception()
        if exception is None:
            try:
                metas, tensors = _prepare(future.result())
            except Exception as e:  # not a sequence of dense tensors: tell the submitter instead
                exception = RuntimeError(f"the task's result cannot be sent to another process: {e!r}")
            else:
                self.channel.sender.put(("result", self.task_id, metas), tensors)
                return
        try:
            blob = pickle.dumps(exception)
            pickle.loads(blob)
        except Exception:
            blob = pickle.dumps(RuntimeError(f"{type(exception).__name__}: {exception}"))
        self.channel.sender.put(("error", self.task_id, blob))


class _HubChannel:
    """One connection from a client process, as seen by the hub."""

    def __init__(self, hub: _Hub, sock: socket.socket):
        self.hub, self.sock = hub, sock
        self.futures: Dict[int, _RemoteTaskFuture] = {}
        self.sender = _Sender(sock, "TaskPool.hub.sender", self._on_send_error)

    def _on_send_error(self, error: BaseException) -> None:
        logger.debug(f"TaskPool hub: could not answer a client process ({error!r}), closing its connection")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        try:
            while True:
                header = _recv_header(self.sock)
                if header[0] == "task":
                    _, pool_id, task_id, metas, owner = header
                    tensors = _recv_tensors(self.sock, metas)
                    future = self.futures[task_id] = _RemoteTaskFuture(self, task_id)
                    pool = self.hub.pools.get(pool_id)
                    if pool is None:
                        future.set_exception(RuntimeError("the task pool no longer exists (it was shut down)"))
                    else:
                        pool._accept_task(future, tensors, owner)
                elif header[0] == "cancel":
                    future = self.futures.get(header[1])
                    if future is not None:
                        future.cancel()
                else:
                    raise ValueError(f"unknown message kind {header[0]!r}")
        except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
            logger.debug(f"TaskPool hub: a client process disconnected ({e!r})")
        finally:
            for future in list(self.futures.values()):
                future.cancel()  # its tasks have nobody to answer to: the pool drops those not yet started
            self.sender.close()
            self.hub.channels.discard(self)
            try:
                self.sock.close()
            except OSError:
                pass


class _Hub:
    """Accepts connections from client processes and hands their tasks to the pools of this process."""

    def __init__(self):
        self.pid = os.getpid()
        self.key = os.urandom(_KEY_BYTES)
        self._tempdir = None
        if sys.platform.startswith("linux"):
            self.address = f"\0hivemind-taskpool-{self.pid}-{os.urandom(8).hex()}"
        else:
            self._tempdir = tempfile.mkdtemp(prefix="hivemind-taskpool-")
            self.address = os.path.join(self._tempdir, "hub.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _enlarge_buffers(self.listener)
        self.listener.bind(self.address)
        self.listener.listen(128)
        self.pools: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.pool_ids = itertools.count()
        self.channels: set = set()
        self.closed = False
        threading.Thread(target=self._accept_loop, name="TaskPool.hub", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                if self.closed:
                    return
                continue
            threading.Thread(target=self._serve, args=(sock,), name="TaskPool.hub.reader", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        _enlarge_buffers(sock)
        try:
            sock.settimeout(_CONNECT_TIMEOUT)
            key = bytearray(_KEY_BYTES)
            _recv_exact_into(sock, memoryview(key))
            if not hmac.compare_digest(bytes(key), self.key):
                raise ValueError("wrong key")
            sock.sendall(b"ok")
            sock.settimeout(None)
        except (OSError, EOFError, ValueError) as e:
            logger.debug(f"TaskPool hub: refused a connection ({e!r})")
            sock.close()
            return
        channel = _HubChannel(self, sock)
        self.channels.add(channel)
        channel.serve()

    def close(self) -> None:
        """Stop accepting connections (at interpreter exit); removes the socket file where there is one."""
        if self.pid != os.getpid():
            return
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    def close_inherited(self) -> None:
        """In a forked child: close this process's copies of the parent's sockets (the parent keeps serving)."""
        self.closed = True
        for sock in (self.listener, *(channel.sock for channel in list(self.channels))):
            try:
                sock.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------- client side


class _Client:
    """This process's connection to the hub of another process."""

    def __init__(self, address: str, key: bytes, owner_pid: int):
        self.address, self.owner_pid = address, owner_pid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _enlarge_buffers(self.sock)
        try:
            self.sock.settimeout(_CONNECT_TIMEOUT)
            self.sock.connect(address)
            self.sock.sendall(key)
            reply = bytearray(2)
            _recv_exact_into(self.sock, memoryview(reply))
            if reply != b"ok":
                raise ConnectionError(f"unexpected reply {bytes(reply)!r}")
            self.sock.settimeout(None)
        except (OSError, EOFError) as e:
            self.sock.close()
            raise RuntimeError(
                f"cannot reach the process that runs this task pool (pid {owner_pid}): {e!r}; "
                f"is the server still running?"
            ) from None
        self.lock = threading.Lock()
        self.futures: Dict[int, concurrent.futures.Future] = {}
        self.task_ids = itertools.count()
        self.broken: Optional[str] = None
        self.sender = _Sender(self.sock, "TaskPool.client.sender", self._on_send_error)
        threading.Thread(target=self._read_loop, name="TaskPool.client.reader", daemon=True).start()

    def submit(self, pool_id: int, future: concurrent.futures.Future, tensors: Sequence[torch.Tensor], owner) -> None:
        task_id = next(self.task_ids)
        with self.lock:
            broken = self.broken
            if broken is None:
                self.futures[task_id] = future
        if broken is not None:
            future.set_exception(RuntimeError(broken))
            return
        try:
            metas, prepared = _prepare(tensors)
        except Exception as e:
            with self.lock:
                self.futures.pop(task_id, None)
            future.set_exception(ValueError(f"the task's tensors cannot be sent to the task pool: {e!r}"))
            return
        future.add_done_callback(lambda done: self._on_done(task_id, done))
        self.sender.put(("task", pool_id, task_id, metas, owner), prepared)

    def _on_done(self, task_id: int, future: concurrent.futures.Future) -> None:
        with self.lock:
            self.futures.pop(task_id, None)
        if future.cancelled() and self.broken is None:
            self.sender.put(("cancel", task_id))

    def _read_loop(self) -> None:
        reason = "the connection was closed"
        try:
            while True:
                header = _recv_header(self.sock)
                if header[0] == "result":
                    _, task_id, metas = header
                    result = tuple(_recv_tensors(self.sock, metas))
                    self._complete(task_id, result, None)
                elif header[0] == "error":
                    _, task_id, blob = header
                    self._complete(task_id, None, pickle.loads(blob))
                else:
                    raise ValueError(f"unknown message kind {header[0]!r}")
        except Exception as e:
            reason = repr(e)
        self._fail_all(
            f"lost the connection to the process that runs the task pool (pid {self.owner_pid}): {reason}; "
            f"the server may have shut down"
        )

    def _complete(self, task_id: int, result: Any, exception: Optional[BaseException]) -> None:
        with self.lock:
            future = self.futures.get(task_id)
        if future is None:
            return
        try:
            if exception is None:
                future.set_result(result)
            else:
                future.set_exception(exception)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled here meanwhile

    def _on_send_error(self, error: BaseException) -> None:
        self._fail_all(
            f"could not send a task to the process that runs the task pool (pid {self.owner_pid}): {error!r}"
        )

    def _fail_all(self, reason: str) -> None:
        with self.lock:
            if self.broken is None:
                self.broken = reason
            futures, self.futures = list(self.futures.values()), {}
        with _clients_lock:
            if _clients.get(self.address) is self:
                del _clients[self.address]
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sender.close()
        for future in futures:
            try:
                future.set_exception(RuntimeError(reason))
            except concurrent.futures.InvalidStateError:
                pass


# ----------------------------------------------------------------------------------------------- per process state

_hub_lock = threading.Lock()
_hub: Optional[_Hub] = None
_clients_lock = threading.Lock()
_clients: Dict[str, _Client] = {}


def _get_hub() -> _Hub:
    global _hub
    with _hub_lock:
        if _hub is None or _hub.pid != os.getpid():
            _hub = _Hub()
            atexit.register(_hub.close)
        return _hub


def register_pool(pool: Any) -> PoolEndpoint:
    """Make ``pool`` reachable from other processes; returns what they need to reach it."""
    hub = _get_hub()
    pool_id = next(hub.pool_ids)
    hub.pools[pool_id] = pool
    return hub.address, hub.key, pool_id, hub.pid


def unregister_pool(endpoint: PoolEndpoint) -> None:
    address, _, pool_id, owner_pid = endpoint
    hub = _hub
    if hub is not None and hub.pid == owner_pid == os.getpid() and hub.address == address:
        hub.pools.pop(pool_id, None)


def get_local_pool(endpoint: PoolEndpoint) -> Optional[Any]:
    """The pool itself if ``endpoint`` belongs to this process, else None."""
    address, _, pool_id, owner_pid = endpoint
    hub = _hub
    if hub is not None and hub.pid == owner_pid == os.getpid() and hub.address == address:
        return hub.pools.get(pool_id)
    return None


def submit_remote_task(
    endpoint: PoolEndpoint, future: concurrent.futures.Future, tensors: Sequence[torch.Tensor], owner: Any = None
):
    """Send a task of ``owner`` to the pool at ``endpoint`` (in another process); ``future`` receives its result or
    error."""
    address, key, pool_id, owner_pid = endpoint
    with _clients_lock:
        client = _clients.get(address)
    if client is None:
        try:
            new_client = _Client(address, key, owner_pid)
        except RuntimeError as e:
            future.set_exception(e)
            return
        with _clients_lock:
            client = _clients.setdefault(address, new_client)
        if client is not new_client:
            new_client._fail_all("superseded by a concurrent connection")
    client.submit(pool_id, future, tensors, owner)


def _after_fork_in_child() -> None:
    # the child must neither serve the parent's pools nor keep the parent's connections open (a connection only
    # reports the end of its peer once every copy of it is closed)
    global _hub_lock, _hub, _clients_lock, _clients
    inherited_hub, inherited_clients = _hub, list(_clients.values())
    _hub_lock, _hub, _clients_lock, _clients = threading.Lock(), None, threading.Lock(), {}
    if inherited_hub is not None:
        inherited_hub.close_inherited()
    for client in inherited_clients:
        client.broken = "inherited from the parent process"
        try:
            client.sock.close()
        except OSError:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
