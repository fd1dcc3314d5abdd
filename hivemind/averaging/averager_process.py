"""Process plumbing of DecentralizedAverager: start (fork or spawn), the request pipe, the event loop in the child,
the handlers it serves, and shutdown. The averaging logic itself lives in averager_rounds.py."""

import asyncio
import concurrent.futures
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from hivemind.averaging.averager_rounds import STEP_FAILED_SHUT_DOWN, AveragingRounds
from hivemind.averaging.control import StepControl
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.matchmaking_rules import MAX_GATHER_BYTES
from hivemind.averaging.partition import AllreduceException
from hivemind.averaging.process_teardown import cancel_remaining_tasks, close_p2p_client, let_threads_end
from hivemind.averaging.state_download import load_state_from_peers
from hivemind.averaging.state_rate import configured_min_rate
from hivemind.averaging.state_sharing import StateSharing
from hivemind.averaging.state_snapshot import PackedTensors, await_state_answer, describe_state, send_packed_state
from hivemind.dht.process_channel import (
    READY_CALL_ID,
    CallerEnd,
    ChannelClosedError,
    ServingEnd,
    exitcode_of,
)
from hivemind.p2p import P2PDaemonError, PeerID, ServicerBase
from hivemind.p2p.framing import DEFAULT_MAX_MESSAGE_SIZE
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.p2p.servicer import get_handle_name
from hivemind.utils.asyncio import await_with_timeout, switch_to_uvloop
from hivemind.utils.futures import fail
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

logger = get_logger(__name__)


class TensorTemplate(NamedTuple):
    """The shape and dtype of one state tensor: what a downloaded state must match."""

    shape: Tuple[int, ...]
    dtype: torch.dtype


STATE_TEMPLATE_TIMEOUT = 60.0  # seconds for the user's process to answer get_current_state()
MAX_SMALL_REQUEST_BYTES = 2**20  # a DownloadRequest; a JoinRequest or AveragingData besides its gather or part
PART_SIZE_SLACK = 8  # an all-reduce message may hold this many times part_size_bytes (an uncompressed 4-bit part)
# the averager's process spends at most this share of shutdown_timeout on its own clean-up, leaving the rest for the
# process to exit before the user's process gives up waiting and terminates it
SHUTDOWN_BUDGET_FRACTION = 0.5
RETRACT_BUDGET = 1.0  # seconds at most for withdrawing the state-sharing declaration at shutdown (a DHT store)
TASK_CANCEL_BUDGET = 1.0  # seconds at most for the tasks still running at shutdown (e.g. downloads) to end
THREADS_BUDGET_FRACTION = 0.3  # of shutdown_timeout, for work already handed to threads to end (see let_threads_end)
# shutdown_timeout=None: the user's process waits for the averager's process as long as it takes; the shares above are
# then taken of this many seconds, so that the process still ends on its own in about this time
UNLIMITED_SHUTDOWN_BASE = 5.0


class AveragerProcess(ShutdownOnExit, AveragingRounds, mp.Process, ServicerBase):
    """The process shell; DecentralizedAverager sets the averaging options before calling ``__init__``."""

    def __init__(self, *, daemon: bool, shutdown_timeout: Optional[float], start_method: Optional[str]):
        check_shutdown_timeout(shutdown_timeout, allow_none=True)  # None: wait for the process as long as it takes
        self._start_method = start_method
        self._context = mp.get_context(start_method)
        mp.Process.__init__(self)
        self.daemon, self.shutdown_timeout = daemon, shutdown_timeout
        self._origin_pid = os.getpid()
        self._started = False
        self._shutting_down = False
        self._shutdown_requested = False  # (user process) shutdown() was called
        # user process -> averager process: calls (one duplex pipe, answers come back on it)
        self._caller_connection, self._serving_connection = self._context.Pipe(duplex=True)
        self._caller = CallerEnd(self._caller_connection, "averager", exitcode_of(self))
        # averager process -> user process: "send me get_current_state()" (an MPFuture per request)
        self._state_request_reader, self._state_request_writer = self._context.Pipe(duplex=False)
        self._state_request_lock = threading.Lock()
        self._pending_controls = set()
        self._futures_forgotten = False  # MPFuture.forget_process was called for our process (see _forget_futures)
        # (else a copy of them in another process hides the end of this one's, see there)
        close_in_other_children(self, ["_serving_connection", "_state_request_writer"])

    # ------------------------------------------------------------------ user process side

    def _Popen(self, process_obj):  # called by Process.start(): start the child with the chosen start method
        return self._context.Process._Popen(process_obj)

    def __getstate__(self) -> Dict[str, Any]:
        """What a spawned averager process receives: no user-side channel ends, threads or process handles."""
        state = self.__dict__.copy()
        for name in (
            "_caller",
            "_caller_connection",
            "_state_request_reader",
            "_context",
            "_popen",
            "_state_thread",
            "_state_request_lock",
            "_pending_controls",
        ):
            state.pop(name, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._context = mp.get_context(self._start_method)
        self._state_request_lock = threading.Lock()
        self._popen = None

    def start(self) -> None:
        """Start the averager's process (without waiting for it: see wait_until_ready)."""
        if self._started:
            raise RuntimeError("the averager was already started")
        self._started = True
        mp.Process.start(self)
        register_started_handle(self)
        self._serving_connection.close()  # the child holds its own copies; ours must go so that EOF is noticed
        self._state_request_writer.close()
        self._caller.start_reader()
        self._state_thread = threading.Thread(
            target=self._serve_state_requests, name=f"{type(self).__name__}.state", daemon=True
        )
        self._state_thread.start()

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        """Start the averager's process; with ``await_ready``, wait until it runs (re-raising its start-up error)."""
        self.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: Optional[float] = None) -> None:
        """Block until the averager runs; re-raises the exception that made its start fail, if any."""
        self._caller.ready.result(timeout=timeout)

    def _check_running(self) -> None:
        if not self._started:
            raise RuntimeError("the averager is not started: pass start=True or call run_in_background()")
        if os.getpid() != self._origin_pid:
            raise RuntimeError("an averager can only be used from the process that created it")

    def _call_future(self, method: str, *args) -> MPFuture:
        self._check_running()
        future = MPFuture()
        self._caller.call(future, method, *args)
        return future

    def _send_one_way(self, method: str, *args, on_error=None) -> None:
        """Send a request whose answer nobody waits for (errors are logged, or passed to ``on_error``)."""
        self._check_running()
        future = concurrent.futures.Future()

        def _check_answer(done: concurrent.futures.Future) -> None:
            error = None if done.cancelled() else done.exception()
            if error is not None:
                logger.debug(f"{type(self).__name__}.{method} failed in the averager's process: {error!r}")
                if on_error is not None:
                    on_error(error)

        future.add_done_callback(_check_answer)
        self._caller.call(future, method, *args)

    def _send_step(self, control: StepControl) -> None:
        def _fail_step(error: BaseException) -> None:
            if isinstance(error, ChannelClosedError):  # it ended before taking the step: the same error as the others
                why = STEP_FAILED_SHUT_DOWN if self._shutdown_requested else self._exit_description()
                error = AllreduceException(why)
            fail(control, error)  # (unless failed meanwhile by the state thread or shutdown())

        # a control the user drops would look cancelled to the averager (its shared slot is freed): keep it until done
        self._pending_controls.add(control)
        control.add_done_callback(self._pending_controls.discard)
        self._send_one_way("step", control, on_error=_fail_step)

    def _serve_state_requests(self) -> None:
        """User-process thread: answers the averager's requests for get_current_state() until it exits."""
        while True:
            try:
                future, template_only = self._state_request_reader.recv()
            except (EOFError, OSError):
                if not self._shutdown_requested:  # nobody else would fail its running steps: they would hang
                    self._fail_pending_controls(self._exit_description())
                    self._forget_futures()  # (shutdown() does it otherwise)
                return
            except Exception as e:
                logger.warning(f"Could not read a state request from the averager's process: {e!r}")
                continue
            try:
                if template_only:  # only what a downloaded state must look like: no tensor data is copied or sent
                    template = [TensorTemplate(*pair) for pair in describe_state(self.get_current_state)]
                    future.set_result((None, template, None))
                else:  # the tensors cross in one shared-memory buffer (no copy if they already are in one)
                    metadata, tensors, *infos = self.get_current_state()
                    send_packed_state(future, (metadata, tensors, *infos), receiver_sentinel=self.sentinel)
                    del metadata, tensors, infos  # the averager's process alone holds the state while it streams it
            except Exception as e:
                gone = self._shutdown_requested or multiprocessing.connection.wait([self.sentinel], timeout=0)
                if isinstance(e, ChannelClosedError) and gone:
                    # e.g. the default get_current_state asks the averager for its group bits: it is gone
                    logger.debug(f"get_current_state() was cut short by the averager's shutdown: {e!r}")
                else:
                    logger.warning(f"get_current_state() failed, the download is refused: {e!r}")
                try:
                    future.set_exception(e)
                except Exception:
                    pass

    def shutdown(self) -> None:
        """Leave the swarm: cancel running steps, remove the handlers, stop the process."""
        if not self._started or os.getpid() != self._origin_pid or getattr(self, "_popen", None) is None:
            return
        self._shutdown_requested = True
        with stop_lock(self):  # (several threads may call it at once)
            if getattr(self, "_stopping_in", None) == threading.get_ident():
                return  # a signal handler interrupted shutdown() in this thread (maybe mid-send): that pass finishes
            self._stopping_in = threading.get_ident()
            try:
                if self.is_alive():
                    try:
                        self._caller.call(concurrent.futures.Future(), "shutdown")
                    except Exception:
                        pass
                    self.join(self.shutdown_timeout)
                    if self.is_alive():
                        name = type(self).__name__
                        logger.warning(f"{name} did not shut down in {self.shutdown_timeout} s, terminating it")
                        self.terminate()
                        self.join()
                self._caller.close()
                self._caller.fail_pending(ChannelClosedError("the averager was shut down"))
                self._state_request_reader.close()  # (closed by two threads at once, its fd could be reused)
                self._forget_futures()  # our ways to its state requests (see there): it is gone
                # e.g. the process had to be terminated before it answered
                self._fail_pending_controls(STEP_FAILED_SHUT_DOWN)
            finally:
                self._stopping_in = None

    def _forget_futures(self) -> None:
        """Drop what this process cached to reach our (exited) process's futures, once: a shutdown() long after the
        state thread saw the process die would otherwise drop the connection of whatever process got its pid since."""
        if not self._futures_forgotten:
            self._futures_forgotten = True
            MPFuture.forget_process(self.pid)

    def _fail_pending_controls(self, message: str) -> None:
        for control in list(self._pending_controls):
            fail(control, AllreduceException(message))

    def _exit_description(self) -> str:
        """Why running steps fail when the averager's process ended without shutdown() (killed, crashed)."""
        # its pipes close a moment before its exit status is known. This runs in the state thread while the user's
        # thread may be in join(): peek at the status, since reaping it here would make join() report no exit code
        multiprocessing.connection.wait([self.sentinel], timeout=1.0)
        code = peek_exitcode(self, wait=1.0)
        return (
            f"Averaging step failed: the averager's process exited unexpectedly (exit code {code}); "
            "create a new averager to keep averaging"
        )

    # ------------------------------------------------------------------ averager process side

    def run(self) -> None:
        """The averager's process: set up matchmaking and state sharing, then serve until shutdown."""
        for name in ("_caller_connection", "_state_request_reader"):
            if hasattr(self, name):
                getattr(self, name).close()  # forked copies of the user-side ends
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the creator decides
        tune_malloc_for_large_messages()  # this process moves big tensors (see malloc_tuning)
        # a forked child must not enter the intra-op thread pool inherited from a parent that used it (it hangs), and
        # this process does little arithmetic: one thread
        torch.set_num_threads(1)
        loop = switch_to_uvloop()
        stopped = asyncio.Event()
        stop_when_parent_exits(self, loop, stopped.set)  # also when it is killed (see there)
        serving = ServingEnd(self._serving_connection, self._make_handlers(stopped), on_closed=stopped.set)
        try:
            loop.run_until_complete(self._serve(loop, serving, stopped))
        finally:
            serving.stop()
            cancel_remaining_tasks(loop, TASK_CANCEL_BUDGET)
            close_p2p_client(loop, getattr(self, "_p2p", None), TASK_CANCEL_BUDGET)
            loop.run_until_complete(loop.shutdown_asyncgens())
            let_threads_end(loop, THREADS_BUDGET_FRACTION * self._shutdown_base)
            loop.close()
            self._serving_connection.close()
            self._state_request_writer.close()
        # clean-up is done: end the process at once (see exit_once_cleaned_up). A spawned process would otherwise
        # finalize the whole interpreter (torch included), 1-3 s on a busy machine: past the user's shutdown_timeout
        if mp.current_process() is self:  # not when run() was called in the user's own process
            exit_once_cleaned_up(self._context.get_start_method())

    async def _serve(self, loop: asyncio.AbstractEventLoop, serving: ServingEnd, stopped: asyncio.Event) -> None:
        self._init_round_state()
        try:
            self._state_min_rate = configured_min_rate()  # the pace floor of state downloads, on both ends
            self._p2p = await self.dht.replicate_p2p()
            self._matchmaking = Matchmaking(
                self._p2p,
                self.schema_hash,
                self.dht,
                servicer_type=type(self),
                prefix=self.prefix,
                target_group_size=self.target_group_size,
                min_group_size=self.min_group_size,
                min_matchmaking_time=self.min_matchmaking_time,
                request_timeout=self.request_timeout,
                client_mode=self.client_mode,
                initial_group_bits=self.initial_group_bits,
            )
            self._state_sharing = StateSharing(
                dht=self.dht,
                peer_id=self._p2p.peer_id,
                prefix=self.prefix,
                get_current_state=self._get_current_state_from_host,
                state_compression=self.state_compression,
                allow_state_sharing=bool(self._allow_state_sharing.value),
                state_sharing_priority=float(self._state_sharing_priority.value),
                declare_state_period=self.declare_state_period,
                client_mode=self.client_mode,
                min_send_rate=self._state_min_rate,
            )
            if not self.client_mode:
                await self._add_handlers()
            await self._state_sharing.start()
        except BaseException as e:
            logger.debug(f"{type(self).__name__} failed to start: {e!r}")
            serving.send(READY_CALL_ID, False, e)
            return
        serving.start(loop)
        serving.send(READY_CALL_ID, True, None)
        if mp.current_process() is self:  # a SIGTERM while serving closes its P2P replica (and socket) first
            GracefulSigterm(loop, stopped, grace=self.shutdown_timeout).install().serving()
        try:
            await stopped.wait()
        finally:
            await self._shutdown_in_child()

    async def _add_handlers(self) -> None:
        """Serve the rpc_* handlers under the prefix; a request larger than its handler can need is refused on its
        announced size (it would otherwise be buffered, several per stream, up to the p2p layer's 256 MiB each)."""
        limits = dict(
            rpc_join_group=MAX_GATHER_BYTES + MAX_SMALL_REQUEST_BYTES,
            rpc_download_state=MAX_SMALL_REQUEST_BYTES,
            # a part has about part_size_bytes on the wire; a sender may skip our compression (up to 8x larger)
            rpc_aggregate_part=PART_SIZE_SLACK * self.part_size_bytes + MAX_SMALL_REQUEST_BYTES,
        )
        try:
            await asyncio.gather(
                *(
                    self._p2p.add_protobuf_handler(
                        get_handle_name(self.prefix, type(self).__name__, handler.name),
                        getattr(self, handler.name),
                        handler.request_type,
                        stream_input=handler.stream_input,
                        stream_output=handler.stream_output,
                        max_message_size=limits.get(handler.name, DEFAULT_MAX_MESSAGE_SIZE),
                    )
                    for handler in self._get_rpc_handlers()
                )
            )
        except ControlFailure as e:  # e.g. an Optimizer created again (same run_id) before the old one was shut down
            if "already set" not in str(e):
                raise
            raise ControlFailure(
                f"another {type(self).__name__} with prefix {self.prefix!r} already runs on this DHT ({e}): shut "
                f"it down first, or give this one another prefix (for hivemind.Optimizer: another run_id)"
            ) from None

    @property
    def _shutdown_base(self) -> float:
        """seconds of which the averager's process takes its own clean-up budgets"""
        return UNLIMITED_SHUTDOWN_BASE if self.shutdown_timeout is None else self.shutdown_timeout

    async def _shutdown_in_child(self) -> None:
        """Cancel the steps, withdraw the state-sharing declaration and remove the handlers, all at once and within
        a budget shorter than the user process waits (``shutdown_timeout``), so that the process ends on its own.

        The withdrawal is a courtesy (the declaration expires anyway): it gets at most RETRACT_BUDGET seconds, since
        a busy or stopped DHT process would otherwise hold the shutdown for the DHT's own timeouts.
        """
        self._shutting_down = True
        budget = SHUTDOWN_BUDGET_FRACTION * self._shutdown_base
        steps = [
            ("cancel steps", self._cancel_steps(), budget),
            ("stop state sharing", self._state_sharing.shutdown(), min(RETRACT_BUDGET, budget)),
        ]
        if not self.client_mode:
            steps.append(("remove handlers", self.remove_p2p_handlers(self._p2p, namespace=self.prefix), budget))

        async def _bounded(what: str, coroutine, timeout: float) -> None:
            try:
                await await_with_timeout(coroutine, timeout)
            except asyncio.TimeoutError:
                logger.debug(f"{type(self).__name__} shutdown: gave up on the {what} step after {timeout:.2f} s")
            except P2PDaemonError as e:  # the DHT's p2pd is gone (e.g. the DHT was shut down first): nothing to undo
                logger.debug(f"{type(self).__name__} shutdown: did not {what}, the p2p daemon is gone: {e!r}")
            except Exception as e:
                logger.warning(f"{type(self).__name__} shutdown: could not {what}: {e!r}")

        await asyncio.gather(*(_bounded(*step) for step in steps))

    def _make_handlers(self, stopped: asyncio.Event):
        async def step(control: StepControl) -> None:
            self._start_step(control)

        async def get_group_bits() -> str:
            return self._matchmaking.group_key_manager.group_bits

        async def set_group_bits(group_bits: str) -> None:
            key_manager = self._matchmaking.group_key_manager
            key_manager.group_bits = group_bits

        async def update_state_sharing() -> None:
            self._state_sharing.allow_state_sharing = bool(self._allow_state_sharing.value)
            self._state_sharing.state_sharing_priority = float(self._state_sharing_priority.value)

        async def shutdown() -> None:
            stopped.set()

        return dict(
            step=step,
            get_group_bits=get_group_bits,
            set_group_bits=set_group_bits,
            load_state_from_peers=self._load_state_from_peers,
            load_state_excluding=self._load_state_excluding,
            update_state_sharing=update_state_sharing,
            shutdown=shutdown,
        )

    async def _get_current_state_from_host(self, template_only: bool = False) -> Tuple[Any, Any, Any]:
        """Ask the user's process for get_current_state() (it may be overridden there).

        :param template_only: return only the shapes and dtypes of its tensors (no data crosses the pipe)
        """
        future = MPFuture()
        with self._state_request_lock:
            self._state_request_writer.send((future, template_only))
        metadata, tensors, *infos = await await_state_answer(future)
        if isinstance(tensors, PackedTensors):
            tensors = tensors.unpack()
        return (metadata, tensors, *infos)

    async def _load_state_from_peers(self, timeout: Optional[float] = None):
        loaded = await self._load_state_excluding(timeout)
        return None if loaded is None else loaded[:2]

    async def _load_state_excluding(
        self, timeout: Optional[float] = None, exclude: Sequence[PeerID] = (), optional_tail: int = 0
    ):
        """(metadata, tensors, donor) of the best donor not in ``exclude``, or None; a state may lack the template's
        last ``optional_tail`` tensors"""
        # what a donor's state must look like: our own state (get_current_state may be overridden); within ``timeout``
        started = time.monotonic()
        template_timeout = STATE_TEMPLATE_TIMEOUT if timeout is None else min(STATE_TEMPLATE_TIMEOUT, timeout)
        try:
            _, expected_tensors, _ = await await_with_timeout(
                self._get_current_state_from_host(template_only=True), template_timeout
            )
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError(
                f"get_current_state() gave no answer within {template_timeout:.1f} s, so a downloaded state could not "
                "be checked against ours; nothing was downloaded (make get_current_state faster or pass a longer "
                "timeout)"
            ) from None
        if timeout is not None:
            timeout = max(timeout - (time.monotonic() - started), 0.0)
        return await load_state_from_peers(
            p2p=self._p2p,
            dht=self.dht,
            prefix=self.prefix,
            servicer_type=type(self),
            own_peer_id=self._p2p.peer_id,
            expected_tensors=list(expected_tensors),
            optional_tail=min(optional_tail, len(expected_tensors)),
            timeout=timeout,
            request_timeout=self.request_timeout,
            next_chunk_timeout=self.next_chunk_timeout,
            min_rate=self._state_min_rate,
            exclude=frozenset(exclude),
            with_donor=True,
        )
