"""DHT: a DHTNode running in a background process with its own event loop, driven through futures."""

import asyncio
import concurrent.futures
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import uuid
from functools import partial
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Sequence, TypeVar, Union

from multiaddr import Multiaddr

from hivemind.dht.node import DEFAULT_NUM_WORKERS, DHTNode
from hivemind.dht.process_channel import (
    READY_CALL_ID,
    CallerEnd,
    ServingEnd,
    SocketAcceptor,
    connect_to_dht_process,
    exitcode_of,
)
from hivemind.dht.routing import DHTKey, DHTValue, Subkey
from hivemind.dht.validation import CompositeValidator, RecordValidatorBase, validator_list
from hivemind.p2p import P2P, PeerID
from hivemind.utils.asyncio import switch_to_uvloop
from hivemind.utils.graceful_sigterm import GracefulSigterm
from hivemind.utils.logging import get_logger
from hivemind.utils.malloc_tuning import tune_malloc_for_large_messages
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.process_handle import (
    ShutdownOnExit,
    check_shutdown_timeout,
    close_in_other_children,
    exit_once_cleaned_up,
    peek_exitcode,
    register_started_handle,
    stop_lock,
    stop_when_parent_exits,
)
from hivemind.utils.timed_storage import DHTExpiration, ValueWithExpiration, get_dht_time

logger = get_logger(__name__)

DURATION_LIKE_AGE = 365 * 24 * 3600  # store() warns about an expiration_time older than this: a duration, surely

ReturnType = TypeVar("ReturnType")
# one socket connection per process, even if several threads call at once; reentrant: a signal handler's call while
# its thread connects (the first call of a forked process) connects too instead of waiting for it forever
_connect_lock = threading.RLock()


def _reset_connect_lock() -> None:
    global _connect_lock
    _connect_lock = threading.RLock()  # a lock held by another thread while forking would never be released


os.register_at_fork(after_in_child=_reset_connect_lock)


MaddrLike = Union[Multiaddr, str]


def _as_maddr_strings(initial_peers: Optional[Sequence[MaddrLike]]) -> Optional[List[str]]:
    """Check the type of initial_peers (a sequence of str or Multiaddr) and return them as strings."""
    if initial_peers is None:
        return None
    if isinstance(initial_peers, (str, bytes)):
        # a multiaddr holds no comma or space: "a,b", "a, b" and "a b" (as --initial_peers prints them) are lists
        example = (
            (initial_peers.replace(",", " ").split() or [initial_peers])
            if isinstance(initial_peers, str)
            else [initial_peers]
        )
        raise TypeError(f"initial_peers should be a list of multiaddrs, e.g. {example!r}, not a single string")
    is_sequence = isinstance(initial_peers, Sequence)
    if not is_sequence or any(not isinstance(item, (Multiaddr, str)) for item in initial_peers):
        raise TypeError(f"initial_peers should be a sequence of str or Multiaddr, got {initial_peers!r}")
    return [str(maddr) for maddr in initial_peers]


class DHT(ShutdownOnExit, mp.Process):
    """
    A DHT peer: runs a :class:`DHTNode` (and, unless ``p2p`` is given, its own p2pd daemon) in a child process.
    Calls from the creating process travel over a pipe; each returns its result, or an MPFuture with
    ``return_future=True``. Usable as a context manager: ``with DHT(start=True) as dht: ...`` shuts down on exit.

    :param initial_peers: multiaddrs (str or Multiaddr, each ending in /p2p/<peer id>) of peers to join
    :param start: start the process right away (in the constructor)
    :param p2p: attach to this P2P's daemon instead of starting a new one
    :param daemon: make the child a daemon process (killed when the creating process exits)
    :param num_workers: concurrent RPCs per DHT search
    :param record_validators: validators of DHT records, combined into one CompositeValidator
    :param shutdown_timeout: seconds to wait for a graceful shutdown before terminating the process
    :param await_ready: with start=True, wait until the node is running and re-raise its start-up error, if any
    :param start_method: multiprocessing start method ("fork", "spawn", "forkserver"); None = the default context's
    :param kwargs: forwarded to DHTNode.create and from there to P2P.create (e.g. host_maddrs, client_mode)
    """

    def __init__(
        self,
        initial_peers: Optional[Sequence[MaddrLike]] = None,
        *,
        start: bool,  # start the child process right away
        p2p: Optional[P2P] = None,
        daemon: bool = True,
        num_workers: int = DEFAULT_NUM_WORKERS,  # concurrent RPCs of one search
        record_validators: Iterable[RecordValidatorBase] = (),
        shutdown_timeout: float = 3,
        await_ready: bool = True,
        start_method: Optional[str] = None,
        **kwargs,
    ):
        check_shutdown_timeout(shutdown_timeout, allow_none=True)  # None: wait for the process as long as it takes
        self._start_method = start_method
        self._context = mp.get_context(start_method)
        super().__init__()

        self.initial_peers = _as_maddr_strings(initial_peers)
        self.num_workers, self.shutdown_timeout, self.kwargs = num_workers, shutdown_timeout, kwargs
        self._record_validator = CompositeValidator(record_validators)
        self._existing_daemon = None if p2p is None else str(p2p.daemon_listen_maddr)
        # replicas of the daemon (in the DHT process with p2p=..., in users' processes) take the messages it takes
        max_msg_size = kwargs.get("persistent_conn_max_msg_size") if p2p is None else p2p.persistent_conn_max_msg_size
        self._replica_options = {} if max_msg_size is None else {"persistent_conn_max_msg_size": max_msg_size}
        self.daemon = daemon
        self._origin_pid = os.getpid()

        # the creating process talks to the DHT process over a pipe; other processes (forked or spawned workers that
        # hold a copy of this object) connect to a Unix socket of the DHT process on their first call
        self._caller_connection, self._serving_connection = self._context.Pipe(duplex=True)
        close_in_other_children(self, ["_serving_connection"])  # (else a copy hides this process's end, see there)
        self._callers: Dict[int, CallerEnd] = {
            self._origin_pid: CallerEnd(self._caller_connection, exitcode=exitcode_of(self))
        }
        self._socket_address = _socket_path(f"hivemind-dht-{uuid.uuid4().hex}.sock")
        self._socket_authkey = os.urandom(32)
        self._started = False
        self._peer_id: Optional[PeerID] = None
        self._client_mode: Optional[bool] = None
        self._p2p_replicas = {}  # pid -> P2P bound to this DHT's daemon in that process

        if start:
            self.run_in_background(await_ready)

    # ------------------------------------------------------------------ process plumbing

    def _Popen(self, process_obj):  # called by Process.start(): start the child with the chosen start method
        return self._context.Process._Popen(process_obj)

    def __getstate__(self):
        """
        What another process receives (the spawned DHT process, or a worker process the DHT is passed to): no
        user-side channel ends and no handle of the child process; such copies call the DHT through its socket.
        """
        state = self.__dict__.copy()
        for name in ("_caller_connection", "_callers", "_context", "_p2p_replicas", "_popen", "_sigterm"):
            state.pop(name, None)
        if self._serving_connection.closed:  # already handed over to the DHT process
            state.pop("_serving_connection")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._context = mp.get_context(self._start_method)
        self._p2p_replicas, self._callers, self._popen = {}, {}, None

    def start(self) -> None:
        """Start the DHT process (without waiting for it: see wait_until_ready)."""
        self._started = True
        super().start()
        register_started_handle(self)
        self._serving_connection.close()  # the child holds its own copy; ours must go so that EOF is noticed
        self._callers[self._origin_pid].start_reader()

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        """Start the DHT process; with ``await_ready``, wait for the node to run (re-raising its start-up error)."""
        self.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: Optional[float] = None) -> None:
        """Block until the node runs; re-raises the exception that made the start fail, if any."""
        self._callers[self._origin_pid].ready.result(timeout=timeout)

    def run(self) -> None:
        """The DHT process: create the node, then serve calls until shutdown or until the creator goes away."""
        if hasattr(self, "_caller_connection"):
            self._caller_connection.close()  # forked copy of the user-side end
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the creator decides
        tune_malloc_for_large_messages()  # this process belongs to the library (see malloc_tuning)
        loop = switch_to_uvloop()
        stopped = asyncio.Event()
        stop_when_parent_exits(self, loop, stopped.set)  # also when it is killed (see there)
        self._sigterm = GracefulSigterm(loop, stopped, grace=self.shutdown_timeout)
        if mp.current_process() is self:
            self._sigterm.install()  # a SIGTERM while serving stops the node cleanly (p2pd, sockets) before exiting
        handlers = self._make_handlers(stopped)
        serving = ServingEnd(self._serving_connection, handlers, on_closed=stopped.set)
        acceptor = SocketAcceptor(self._socket_address, self._socket_authkey, handlers)
        try:
            loop.run_until_complete(self._serve(loop, serving, acceptor, stopped))
        finally:
            acceptor.stop()
            serving.stop()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._serving_connection.close()
        # the node and its p2pd are stopped and the socket closed: end the process now (see exit_once_cleaned_up)
        if mp.current_process() is self:  # not when run() was called in the user's own process
            exit_once_cleaned_up(self._context.get_start_method())

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, serving: ServingEnd, acceptor: SocketAcceptor, stopped: asyncio.Event
    ) -> None:
        try:
            if self._existing_daemon:  # attach to the daemon of the P2P given by the user
                self.kwargs["p2p"] = await P2P.replicate(Multiaddr(self._existing_daemon), **self._replica_options)
            self._node = await DHTNode.create(
                initial_peers=self.initial_peers,
                num_workers=self.num_workers,
                record_validator=self._record_validator,
                **self.kwargs,
            )
            acceptor.start(loop)
            # coroutines of run_coroutine read dht.peer_id / dht.client_mode here, where a call would deadlock
            self._peer_id, self._client_mode = self._node.peer_id, self._node.protocol.client_mode
        except BaseException as e:
            logger.debug(f"DHT failed to start: {e!r}")
            serving.send(READY_CALL_ID, False, e)
            if getattr(self, "_node", None) is not None:  # the socket could not be opened
                await self._node.shutdown()
            await self._close_replica()
            return
        serving.start(loop)
        serving.send(READY_CALL_ID, True, None)
        self._sigterm.serving()
        try:
            await stopped.wait()
        finally:
            await self._node.shutdown()
            await self._close_replica()

    async def _close_replica(self) -> None:
        """Close our client of the user's P2P daemon (the node does not own it); with it goes its socket file."""
        replica = self.kwargs.get("p2p") if self._existing_daemon else None
        if replica is not None:
            await replica.shutdown()

    def _make_handlers(self, stopped: asyncio.Event):
        async def shutdown():
            stopped.set()

        return {
            "get": self._get,
            "store": self._store,
            "run_coroutine": self._run_coroutine,
            "add_validators": self._add_validators,
            "peer_id": self._get_peer_id,
            "client_mode": self._get_client_mode,
            "visible_maddrs": self._get_visible_maddrs,
            "daemon_listen_maddr": self._get_daemon_listen_maddr,
            "shutdown": shutdown,
        }

    def _call(self, method: str, *args, return_future: bool = False, **kwargs):
        assert os.getpid() != self.pid, "calling DHT methods from inside the DHT process would deadlock"
        if not self._started:
            raise RuntimeError("the DHT process is not started: call run_in_background() or pass start=True")
        future = MPFuture() if return_future else concurrent.futures.Future()
        self._caller_of_this_process().call(future, method, *args, **kwargs)
        if return_future:
            return future
        return future.result()

    def _caller_of_this_process(self) -> CallerEnd:
        pid = os.getpid()
        caller = self._callers.get(pid)
        if caller is None:
            with _connect_lock:
                caller = self._callers.get(pid)
                if caller is None:
                    connected = connect_to_dht_process(self._socket_address, self._socket_authkey)
                    # (a signal handler of this thread may have connected meanwhile: its connection is kept and this
                    # one left idle, as closing it under its reader thread's recv could hand that thread another fd)
                    caller = self._callers.setdefault(pid, connected)
        return caller

    def shutdown(self) -> None:
        """Stop the node and its daemon gracefully; terminate the process if it takes over ``shutdown_timeout``."""
        if self._popen is None or os.getpid() != self._origin_pid:
            return
        caller = self._callers[self._origin_pid]
        with stop_lock(self):  # (several threads may call it at once)
            if getattr(self, "_stopping_in", None) == threading.get_ident():
                return  # a signal handler interrupted shutdown() in this thread (maybe mid-send): that pass finishes
            self._stopping_in = threading.get_ident()
            try:
                if self.is_alive():
                    try:
                        caller.call(concurrent.futures.Future(), "shutdown")
                    except Exception:
                        pass
                    self.join(self.shutdown_timeout)
                    if self.is_alive():
                        logger.warning(f"DHT did not shut down within {self.shutdown_timeout} s, terminating it")
                        self.terminate()
                        self.join()
                caller.close()
                caller.fail_pending(RuntimeError("DHT was shut down"))
            finally:
                self._stopping_in = None

    # ------------------------------------------------------------------ public API (user process)

    def get(
        self,
        key: DHTKey,
        latest: bool = False,  # search the whole beam for the newest entry
        return_future: bool = False,
        **kwargs,
    ) -> Union[Optional[ValueWithExpiration[DHTValue]], MPFuture]:
        """
        Find the value of ``key``: None if absent, else ValueWithExpiration (a dict of subkey -> ValueWithExpiration
        for dictionary values). ``latest=True`` searches the whole beam for the newest entry.

        :param kwargs: forwarded to DHTNode.get_many_by_id (num_workers, beam_size, sufficient_expiration_time)
        """
        kwargs.pop("return_futures", None)  # asyncio futures cannot cross processes: the caller has an MPFuture
        return self._call("get", key, latest, return_future=return_future, **kwargs)

    def store(
        self,
        key: DHTKey,
        value: DHTValue,
        expiration_time: DHTExpiration,  # absolute DHT time (s)
        subkey: Optional[Subkey] = None,
        return_future: bool = False,
        **kwargs,
    ) -> Union[bool, MPFuture]:
        """
        Store ``value`` under ``key`` (or ``key``'s ``subkey``) until ``expiration_time`` (absolute DHT time, s).
        Returns True if at least the replicas that answered accepted it.

        :param kwargs: forwarded to DHTNode.store_many (exclude_self, await_all_replicas, ...)
        """
        if isinstance(expiration_time, (int, float)) and expiration_time < get_dht_time() - DURATION_LIKE_AGE:
            logger.warning(  # e.g. expiration_time=60: nothing is stored (the record expired in 1970)
                f"store({key!r}): expiration_time={expiration_time} is long past, so nothing will be stored; it is "
                f"an absolute DHT time: pass hivemind.utils.get_dht_time() + <seconds>"
            )
        return self._call("store", key, value, expiration_time, subkey, return_future=return_future, **kwargs)

    def run_coroutine(
        self, coro: Callable[["DHT", DHTNode], Awaitable[ReturnType]], return_future: bool = False
    ) -> Union[ReturnType, MPFuture]:
        """
        Run ``await coro(dht, node)`` inside the DHT process and return its (picklable) result. Changes it makes
        are only visible inside the DHT process. Cancelling the returned future cancels the coroutine.
        """
        if asyncio.iscoroutine(coro):
            raise TypeError(
                "run_coroutine got a coroutine object: pass the async function itself (not its call result); "
                "the DHT process calls it as coro(dht, node)"
            )
        if not callable(coro):
            raise TypeError(f"coro must be an async function called as coro(dht, node), got {coro!r}")
        return self._call("run_coroutine", coro, return_future=return_future)

    def add_validators(self, record_validators: Iterable[RecordValidatorBase]) -> None:
        """Add record validators to the running node (RuntimeError if the process has not started)."""
        # (peek: is_alive() would reap an ended process under a shutdown() in another thread, see stop_lock)
        if not self._started:
            raise RuntimeError("Can't add validators before the DHT process has started")
        exitcode = peek_exitcode(self) if os.getpid() == self._origin_pid else None
        if exitcode is not None:
            how = f"killed by signal {-exitcode}" if exitcode < 0 else f"exit code {exitcode}, e.g. after shutdown()"
            raise RuntimeError(
                f"Can't add validators: the DHT process has ended ({how}); this DHT cannot be used any more: "
                "create a new DHT"
            )
        self._call("add_validators", validator_list(record_validators))

    @property
    def peer_id(self) -> PeerID:
        if self._peer_id is None:
            self._peer_id = self._call("peer_id")
        return self._peer_id

    @property
    def client_mode(self) -> bool:
        if self._client_mode is None:
            self._client_mode = self._call("client_mode")
        return self._client_mode

    def get_visible_maddrs(self, latest: bool = False) -> List[Multiaddr]:
        """This peer's externally visible multiaddrs, each ending in /p2p/<peer id>."""
        return [Multiaddr(maddr) for maddr in self._call("visible_maddrs", latest)]

    async def replicate_p2p(self) -> P2P:
        """A P2P in the calling process bound to this DHT's daemon (one per process, created on first use)."""
        pid = os.getpid()
        if pid not in self._p2p_replicas:
            loop = asyncio.get_running_loop()
            daemon_maddr = await loop.run_in_executor(None, partial(self._call, "daemon_listen_maddr"))
            self._p2p_replicas[pid] = await P2P.replicate(Multiaddr(daemon_maddr), **self._replica_options)
        return self._p2p_replicas[pid]

    # ------------------------------------------------------------------ handlers (DHT process)

    async def _get(self, key: DHTKey, latest: bool, **kwargs) -> Optional[ValueWithExpiration[DHTValue]]:
        return await self._node.get(key, latest=latest, **kwargs)

    async def _store(
        self, key: DHTKey, value: DHTValue, expiration_time: DHTExpiration, subkey: Optional[Subkey], **kwargs
    ) -> bool:
        return await self._node.store(key, value, expiration_time, subkey=subkey, **kwargs)

    async def _run_coroutine(self, coro: Callable[["DHT", DHTNode], Awaitable[Any]]) -> Any:
        return await coro(self, self._node)

    async def _add_validators(self, record_validators: List[RecordValidatorBase]) -> None:
        self._node.protocol.record_validator.extend(record_validators)

    async def _get_peer_id(self) -> PeerID:
        return self._node.peer_id

    async def _get_client_mode(self) -> bool:
        return self._node.protocol.client_mode

    async def _get_visible_maddrs(self, latest: bool) -> List[str]:
        return [str(maddr) for maddr in await self._node.get_visible_maddrs(latest=latest)]

    async def _get_daemon_listen_maddr(self) -> str:
        return str(self._node.p2p.daemon_listen_maddr)


def _socket_path(name: str) -> str:
    """Where the DHT process listens for other processes: the temporary directory, or /tmp (where p2pd's sockets are
    too) when that path would exceed what a Unix socket address holds (107 bytes on Linux, 103 on macOS)."""
    path = os.path.join(tempfile.gettempdir(), name)
    return path if len(os.fsencode(path)) <= 103 else os.path.join("/tmp", name)


def check_dht_argument(dht: Any) -> None:
    """
    Refuse, with a TypeError saying what to pass, a ``dht`` argument that is plainly no DHT: None, a str or number, a
    collection, a DHTNode (the DHT process's own node) or a P2P. Any other object is taken as a DHT, so that wrappers
    and stand-ins (a test's offline DHT, a mock) keep working as they do with hivemind 1.1.12.
    """
    plainly_not = (str, bytes, int, float, list, tuple, dict, set, DHTNode, P2P)
    if dht is None or isinstance(dht, plainly_not):
        raise TypeError(
            f"dht must be a running hivemind.DHT, got {type(dht).__name__}: {dht!r:.100} (create one with "
            "hivemind.DHT(initial_peers=..., start=True))"
        )
