"""Server: hosts experts, serves them over p2p, batches their requests on a device and announces them in the DHT."""

from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from hivemind.dht import DHT
from hivemind.moe.expert_uid import is_valid_uid
from hivemind.moe.server.checkpoints import CheckpointSaver, is_directory, load_experts, store_experts
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.create_arguments import check_create_arguments, check_server_arguments
from hivemind.moe.server.dht_handler import DHTHandlerThread
from hivemind.moe.server.expert_pattern import generate_uids_from_pattern
from hivemind.moe.server.fast_adam import FastAdam
from hivemind.moe.server.layers import (
    ClippingWrapper,
    add_custom_models_from_file,
    name_to_block,
    name_to_input,
    schedule_name_to_scheduler,
)
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.p2p import PeerInfo
from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.logging import get_logger
from hivemind.utils.nested import nested_map
from hivemind.utils.process_handle import peek_exitcode, recv_unless_parent_exits, was_started
from hivemind.utils.tensor_descr import DUMMY_BATCH_SIZE, BatchTensorDescriptor

__all__ = ["Server", "background_server"]

logger = get_logger(__name__)

_READY_POLL_INTERVAL = 0.05  # seconds between checks that a starting server thread is still alive
_JOIN_TIMEOUT = 10.0  # seconds to wait for the server thread after the runtime stopped


class Server(threading.Thread):
    """
    Hosts ``module_backends`` until ``shutdown()``: a Runtime that processes batches on the device (in this
    thread), a connection handler that answers expert RPCs, a thread that re-announces the experts in the DHT every
    ``update_period`` seconds and, with ``checkpoint_dir``, a thread that saves them as often.

    :param dht: a DHT; started by ``run()`` if it is not running yet, shut down by ``shutdown()``
    :param module_backends: {expert uid: ModuleBackend}
    :param num_connection_handlers: if given, serve requests from this many connection-handler child processes,
        registered as balanced handlers (the daemon spreads the calls among them); if None (the default), serve
        from one handler thread of this process instead (tasks then reach the pools without crossing processes,
        which is faster, and starting costs no process)
    :param update_period: seconds between announcements in the DHT (and checkpoint saves)
    :param expiration: lifetime of each announcement in seconds (default: max(2 * update_period, 3))
    :param start: start serving in the background right away and wait until ready
    :param checkpoint_dir: save the experts there every update_period seconds
    :param handler_processes: force the choice: True serves from ``num_connection_handlers`` (default 1) child
        processes, False from one thread whatever ``num_connection_handlers`` says; None (the default) decides by
        whether ``num_connection_handlers`` is given
    :param kwargs: to the Runtime (prefetch_batches, sender_threads, device, stats_report_interval)
    """

    def __init__(
        self, dht: DHT, module_backends: Dict[str, ModuleBackend], num_connection_handlers: Optional[int] = None,
        update_period: float = 30.0, expiration: Optional[float] = None, start: bool = False,
        checkpoint_dir: Optional[Path] = None, handler_processes: Optional[bool] = None, **kwargs,
    ):  # fmt: skip
        super().__init__(daemon=True, name="hivemind.moe.Server")
        check_server_arguments(dht=dht, module_backends=module_backends, update_period=update_period)
        _check_uids(module_backends, "module_backends")
        self.dht = dht
        self.module_backends = module_backends
        self.update_period = update_period
        if num_connection_handlers is not None and num_connection_handlers < 1:
            raise ValueError(f"num_connection_handlers must be at least 1 (or None), got {num_connection_handlers}")
        if handler_processes is None:
            handler_processes = num_connection_handlers is not None
        num_handlers = (num_connection_handlers or 1) if handler_processes else 1
        self.handler_processes = handler_processes
        self.conn_handlers = [ConnectionHandler(dht, module_backends) for _ in range(num_handlers)]
        self.dht_handler_thread = DHTHandlerThread(module_backends, dht, update_period, expiration, daemon=True)
        self.checkpoint_saver = None
        if checkpoint_dir is not None:
            self.checkpoint_saver = CheckpointSaver(self.module_backends, Path(checkpoint_dir), self.update_period)
        self.runtime = Runtime(module_backends, **kwargs)
        self._stopped = threading.Event()
        self._stop_lock = threading.RLock()  # (reentrant: a signal handler may call shutdown() during shutdown())
        self._shutting_down_in: Optional[int] = None  # the thread whose shutdown() is running
        self._start_error: Optional[BaseException] = None
        if start:
            self.run_in_background(await_ready=True)

    @classmethod
    def create(
        cls,
        num_experts: Optional[int] = None,
        expert_uids: Optional[Sequence[str]] = None,
        expert_pattern: Optional[str] = None,
        expert_cls: str = "ffn",
        hidden_dim: int = 1024,
        optim_cls=torch.optim.Adam,
        scheduler: str = "none",
        num_warmup_steps: Optional[int] = None,
        num_training_steps: Optional[int] = None,
        clip_grad_norm: Optional[float] = None,
        num_handlers: Optional[int] = None,
        min_batch_size: int = 1,
        max_batch_size: int = 4096,
        device: Optional[str] = None,
        initial_peers: Sequence[str] = (),
        checkpoint_dir: Optional[Path] = None,
        compression: int = CompressionType.NONE,  # recorded in the descriptors of floating-point tensors
        stats_report_interval: Optional[int] = None,
        custom_module_path: Optional[str] = None,
        update_period: float = 30.0,
        expiration: Optional[float] = None,
        *,
        start: bool,
        **kwargs,  # to DHT(...)
    ) -> Server:
        """
        Build a server with experts of one registered class and a new DHT node (see the class docstring).

        Uids: exactly ``expert_uids``, or ``num_experts`` uids generated from ``expert_pattern`` (dot-separated
        literals and ``[a:b]`` ranges) that are not yet announced in the DHT (``expert.0``, ``expert.1``, ... without a
        pattern). Experts found in ``checkpoint_dir`` are loaded and count towards ``num_experts``.

        :param optim_cls: factory ``optim_cls(parameters)`` of each expert's optimizer, None = not trained; the
            default ``torch.optim.Adam`` (also when passed explicitly) becomes a :class:`FastAdam`: the same Adam run
            by torch's fastest implementation for the parameters (fused kernel on CPU since torch 2.4); any other
            factory is used as given
        :param num_handlers: serve from this many connection-handler processes; None (the default) serves from one
            handler thread of the server's process (faster: no process boundary for the tensors), not 8 processes
            per expert as the original does
        :param kwargs: to ``DHT(...)``: host_maddrs, announce_maddrs, identity_path, use_relay, client_mode, ...
        """
        check_create_arguments(compression, initial_peers, expert_uids, expert_pattern)
        if custom_module_path is not None:
            add_custom_models_from_file(str(custom_module_path))
        assert expert_cls in name_to_block, (
            f"unknown expert class {expert_cls!r} given as expert_cls (--expert_cls); use one of "
            f"{sorted(name_to_block)} or register one with @register_expert_class in a custom_module_path file"
        )
        assert (expert_pattern is None and num_experts is None) or expert_uids is None, (
            "give either num_experts (optionally with expert_pattern) or expert_uids, not both"
        )
        assert num_experts is not None or expert_uids is not None, "give num_experts or expert_uids"
        _check_uids(expert_uids or (), "expert_uids")
        if scheduler not in schedule_name_to_scheduler:
            raise ValueError(f"unknown scheduler {scheduler!r}; known: {sorted(schedule_name_to_scheduler)}")

        make_backends = partial(
            _make_backends,
            expert_cls=expert_cls,
            hidden_dim=hidden_dim,
            optim_cls=optim_cls,
            scheduler=scheduler,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            clip_grad_norm=clip_grad_norm,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            compression=compression,
        )
        dht = DHT(initial_peers=list(initial_peers), start=True, await_ready=False, **kwargs)
        try:
            # the experts' parameters do not depend on their uids: initialise them while the DHT process starts
            num_modules = len(expert_uids) if expert_uids is not None else num_experts
            modules = _build_modules(num_modules, expert_cls, hidden_dim, with_optimizers=optim_cls is not None)
            module_backends = None
            if expert_uids is not None:  # no DHT lookups needed: finish the experts while the DHT starts
                module_backends = make_backends(list(expert_uids), modules)
            dht.wait_until_ready()
            visible_maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
            logger.info(f"Running DHT node on {visible_maddrs}, initial peers = {list(initial_peers)}")
            if module_backends is None:
                uids = _choose_uids(dht, num_experts, None, expert_pattern, checkpoint_dir)
                module_backends = make_backends(uids, modules)
            if checkpoint_dir is not None:
                load_experts(module_backends, checkpoint_dir)
                store_experts(module_backends, checkpoint_dir)  # now, as 1.1.12 does: a restart finds these experts
            device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return cls(
                dht,
                module_backends,
                num_connection_handlers=num_handlers,  # None: one handler thread in this process
                update_period=update_period,
                expiration=expiration,
                checkpoint_dir=checkpoint_dir,
                device=device,
                stats_report_interval=stats_report_interval,
                start=start,
            )
        except BaseException:
            dht.shutdown()
            raise

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self):
        """A multiprocessing Event, set while the runtime is serving."""
        return self.runtime.ready

    def run(self) -> None:
        """Start the DHT (if needed), announcements, checkpoints and handlers, then run the Runtime in this thread."""
        try:
            num_modules = len(self.module_backends)
            logger.info(f"Server started with {num_modules} modules:")
            for uid, backend in self.module_backends.items():
                trainable = [param.numel() for param in backend.module.parameters() if param.requires_grad]
                logger.info(f"{uid}: {type(backend.module).__name__}, {sum(trainable)} parameters")
            parts = [self._start_dht, self.dht_handler_thread.start]  # (a shutdown() meanwhile skips the rest)
            if self.checkpoint_saver is not None:
                parts.append(self.checkpoint_saver.start)
            for handler in self.conn_handlers:
                start = handler.run_in_background if self.handler_processes else handler.run_in_thread
                parts.append(partial(start, await_ready=True))
            for start in parts:
                if self._stopped.is_set():
                    break
                start()
            if self.handler_processes:
                pids = [getattr(handler, "pid", None) for handler in self.conn_handlers]
                logger.info(f"Serving from {len(pids)} connection handler processes, pids={pids}")
        except BaseException as e:
            if self._stopped.is_set():  # (e.g. shutdown() stopped the DHT while a handler started)
                self._stop_parts()
            self._start_error = e
            self._stopped.set()
            if threading.current_thread() is not self:
                raise  # run() called directly: the caller gets the error
            logger.error(f"Server failed to start: {e!r}")  # run_in_background re-raises it for its caller
            return
        if self._stopped.is_set():  # shutdown() was called while starting: it missed the parts started since
            self._stop_parts()
            return
        try:
            self.runtime.run()
        except BaseException as e:  # e.g. the experts cannot be moved to the device: run_in_background reports it
            self._start_error = e
            if threading.current_thread() is not self:
                raise
            logger.error(f"Server's runtime failed: {e!r}", exc_info=True)

    def _start_dht(self) -> None:
        # (not is_alive(): that could reap the DHT's process under a shutdown() in another thread)
        if not was_started(self.dht):
            self.dht.run_in_background()
        elif (exitcode := peek_exitcode(self.dht)) is not None:
            raise RuntimeError(
                f"the server's DHT process has exited (exit code {exitcode}): "
                "pass a running DHT, or one not started yet"
            )

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        """Start the server thread; with ``await_ready``, wait until it serves (TimeoutError after ``timeout``)."""
        self.start()
        if not await_ready:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.wait(_READY_POLL_INTERVAL):
            if not self.is_alive() or self._start_error is not None:
                error = self._start_error
                self.shutdown()  # whatever did start (announcements, handlers, the DHT) stops again
                raise RuntimeError(f"Server failed to start: {error!r}") from error
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Server did not become ready within {timeout} s")

    def shutdown(self) -> None:
        """Stop in order: connection handlers, DHT announcements, checkpoints, the runtime, then the DHT."""
        logger.info("Shutting down")
        self._stopped.set()
        self.ready.clear()
        me = threading.get_ident()
        if self._shutting_down_in == me:  # a signal handler interrupted shutdown() midway (in a join, a pipe's close):
            return  # that pass finishes (stopping the parts again here waited 10 s in vain or closed a closed fd)
        self._shutting_down_in = me
        try:
            self._stop_parts()
            if self.is_alive() and threading.current_thread() is not self:
                self.join(_JOIN_TIMEOUT)
        finally:
            self._shutting_down_in = None
        logger.info("Server shutdown successfully")

    def _stop_parts(self) -> None:
        """Stop every part started so far. Called by shutdown() and again by run() when shutdown() came while it was
        starting them: a part started after shutdown() went past it (e.g. the DHT, when shutdown() came before run()
        started it) ran on after shutdown() returned, with its p2pd, handlers serving the experts, announcements."""
        with self._stop_lock:  # (one pass at a time: each part is stopped once, in order)
            for handler in self.conn_handlers:
                handler.shutdown()
            self.dht_handler_thread.shutdown(timeout=_JOIN_TIMEOUT)
            if self.checkpoint_saver is not None:
                self.checkpoint_saver.stop.set()
                if self.checkpoint_saver.is_alive():
                    self.checkpoint_saver.join(_JOIN_TIMEOUT)
            self.runtime.shutdown()
            self.dht.shutdown()


def _check_uids(uids: Sequence[str], what: str) -> None:
    """Every hosted uid must be announceable: one invalid uid would make every declaration of the server fail."""
    invalid = [uid for uid in uids if not isinstance(uid, str) or not is_valid_uid(uid)]
    if invalid:
        raise ValueError(
            f"{what} has invalid expert uids {invalid[:5]}; a uid is a prefix and integer coordinates separated "
            f"by dots without leading zeros, e.g. 'ffn.3' or 'ffn.3.14'"
        )


def _choose_uids(
    dht: DHT,
    num_experts: Optional[int],
    expert_uids: Optional[Sequence[str]],
    expert_pattern: Optional[str],
    checkpoint_dir: Optional[Path],
) -> List[str]:
    if expert_uids is not None:
        return list(expert_uids)
    found: List[str] = []
    if checkpoint_dir is not None and is_directory(Path(checkpoint_dir)):
        found = sorted(entry.name for entry in Path(checkpoint_dir).iterdir() if is_directory(entry))
        ignored = [name for name in found if not is_valid_uid(name)]  # e.g. lost+found of a checkpoint volume
        if ignored:
            logger.warning(f"Ignored directories of {checkpoint_dir} that are not expert uids: {ignored}")
            found = [name for name in found if is_valid_uid(name)]
        if len(found) > num_experts:
            raise ValueError(
                f"{checkpoint_dir} holds checkpoints of {len(found)} experts, more than num_experts={num_experts}"
            )
        logger.info(f"Located {len(found)} checkpoints for experts {found}")
    missing = num_experts - len(found)
    if missing == 0:
        return found
    logger.info(f"Generating {missing} expert uids from pattern {expert_pattern}")

    def is_taken(candidates: List[str]) -> List[bool]:
        futures = [dht.get(uid, latest=False, return_future=True) for uid in candidates]
        return [future.result() is not None for future in futures]

    return found + generate_uids_from_pattern(missing, expert_pattern, is_taken, exclude=found, rng=random.Random())


def _import_optimizer_dependencies() -> None:
    try:  # torch's optimizers import torch._dynamo when the first one is built: seconds of pure-Python imports
        import torch._dynamo  # noqa: F401
    except Exception as e:  # the optimizer raises it again if it matters
        logger.debug(f"Could not import torch._dynamo ahead of the optimizers: {e!r}")


def _build_modules(count: int, expert_cls: str, hidden_dim: int, with_optimizers: bool) -> List[torch.nn.Module]:
    """``count`` experts of the class; the imports that the optimizers need run meanwhile in a thread (parameter
    initialisation runs in torch kernels, which release the GIL). Only for our own expert classes, which import
    nothing while they are built: a custom class that did could meet the thread's imports halfway."""
    block_cls, importer = name_to_block[expert_cls], None
    if with_optimizers and "torch._dynamo" not in sys.modules and block_cls.__module__.startswith("hivemind."):
        importer = threading.Thread(target=_import_optimizer_dependencies, name="Server.imports", daemon=True)
        importer.start()
    try:
        return [block_cls(hidden_dim) for _ in range(count)]
    finally:
        if importer is not None:
            importer.join()


def _make_backends(
    uids: Sequence[str],
    modules: Sequence[torch.nn.Module],
    expert_cls: str,
    hidden_dim: int,
    optim_cls,
    scheduler: str,
    num_warmup_steps: Optional[int],
    num_training_steps: Optional[int],
    clip_grad_norm: Optional[float],
    min_batch_size: int,
    max_batch_size: int,
    compression: int,
) -> Dict[str, ModuleBackend]:
    assert len(modules) == len(uids), f"{len(modules)} experts built for {len(uids)} uids"
    make_sample_input = name_to_input[expert_cls]
    sample_args = make_sample_input(DUMMY_BATCH_SIZE, hidden_dim)
    if not isinstance(sample_args, tuple):
        sample_args = (sample_args,)
    args_schema = tuple(BatchTensorDescriptor.from_tensor(arg, compression) for arg in sample_args)
    scheduler_cls = schedule_name_to_scheduler[scheduler]
    if scheduler_cls is not None:
        schedule_kwargs = dict(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
        scheduler_cls = partial(scheduler_cls, **schedule_kwargs)

    backends: Dict[str, ModuleBackend] = {}
    outputs_schema = None
    for uid, expert in zip(uids, modules):
        if outputs_schema is None:  # every expert of the class has the same outputs: one dummy forward is enough
            with torch.no_grad():
                sample_outputs = expert(*sample_args)
            outputs_schema = _describe_outputs(sample_outputs, compression)
        optimizer = lr_scheduler = None
        if optim_cls is not None:
            # the default Adam runs its fastest implementation (fused on CPU with torch >= 2.4): same arithmetic
            optimizer = (FastAdam if optim_cls is torch.optim.Adam else optim_cls)(expert.parameters())
            if scheduler_cls is not None:
                lr_scheduler = scheduler_cls(optimizer)
        if clip_grad_norm is not None and optimizer is not None:
            optimizer = ClippingWrapper(optimizer, clip_grad_norm)
        backends[uid] = ModuleBackend(
            name=uid,
            module=expert,
            optimizer=optimizer,
            scheduler=lr_scheduler,
            args_schema=args_schema,
            outputs_schema=outputs_schema,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
        )
    return backends


def _describe_outputs(outputs, compression: int):
    """Descriptors of a nested structure of output tensors (tuples, lists, dicts), in the same structure."""
    return nested_map(lambda output: BatchTensorDescriptor.from_tensor(output, compression), outputs)


# ---------------------------------------------------------------------- background_server


@contextmanager
def background_server(*args, shutdown_timeout: float = 5, **kwargs) -> Iterator[PeerInfo]:
    """
    Run ``Server.create(*args, start=True, **kwargs)`` in a forked process while the block runs (torch: 1 thread).

    :yields: PeerInfo(peer id, visible multiaddrs) of the server's DHT node
    :raises RuntimeError: the server failed to start (the message carries the reason)
    """
    # not a daemon: it starts its own DHT process; it stops when told or when this process goes away. Other
    # multiprocessing children need no copy of our end (one kept the server running after we were killed)
    parent_end, child_end = mp.Pipe(duplex=True)
    multiprocessing.util.register_after_fork(parent_end, multiprocessing.connection.Connection.close)
    process = mp.Process(target=_serve_in_background, args=(child_end, parent_end, args, kwargs), daemon=False)
    process.start()
    child_end.close()
    # a script that never leaves the block: at exit, multiprocessing joins this process, which waited for it forever
    atexit.register(stop_at_exit := partial(_tell_to_stop, parent_end))
    try:
        try:
            status, payload = parent_end.recv()
        except EOFError:  # its pipe closes a moment before its exit status is known
            process.join(shutdown_timeout)
            raise RuntimeError(f"Server process exited with code {process.exitcode} before it started") from None
        if status != "ok":
            raise RuntimeError(f"Server failed to start: {payload}")
        yield payload
    finally:
        atexit.unregister(stop_at_exit)
        _tell_to_stop(parent_end)
        process.join(shutdown_timeout)
        if process.is_alive():
            logger.warning(f"Background server did not stop within {shutdown_timeout} s, terminating it")
            process.terminate()
            process.join(shutdown_timeout)
            if process.is_alive():
                process.kill()
                process.join()
        parent_end.close()


def _tell_to_stop(parent_end) -> None:
    with suppress(OSError, ValueError):  # (closed: it stopped already)
        parent_end.send("shutdown")


def _serve_in_background(connection, parent_end, args, kwargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    parent_end.close()  # the parent's end, inherited by fork: without closing it, EOF would never arrive
    torch.set_num_threads(1)  # a multi-threaded torch op in a forked child of a process that ran one hangs forever
    try:
        server = Server.create(*args, start=True, **kwargs)
    except BaseException as e:
        connection.send(("error", repr(e)))
        return
    try:
        connection.send(("ok", PeerInfo(server.dht.peer_id, server.dht.get_visible_maddrs())))
        with suppress(EOFError):  # (EOF: the parent went away)
            recv_unless_parent_exits(connection)  # a shutdown request
    finally:
        server.shutdown()
