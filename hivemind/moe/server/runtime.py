"""Runtime: the thread that runs the experts' batches on the device, oldest waiting work first.

It serves the task pools of every ModuleBackend it was given. Among the pools with a batch ready it takes the one with
the smallest ``priority`` (for a TaskPool, the arrival time of its oldest ready work, or the time its previous batch
was taken if that is later: busy pools take turns, and a flooded one does not keep the others waiting), runs
``pool.process_func`` on the batch and hands the outputs back to the pool, which splits them per task. A batch whose
computation raises fails only its own tasks, with that error; the runtime goes on with the next batch. A batch whose
callers all went away before it was loaded is skipped without computing it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import selectors
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hivemind.moe.server.task_pool import AbandonedBatchError
from hivemind.utils.logging import get_logger
from hivemind.utils.throttled_log import ThrottledLog

__all__ = ["Runtime"]

logger = get_logger(__name__)

_SELECT_INTERVAL = 1.0  # seconds between checks of the shutdown flag while idle (a wake-up pipe also ends waits)
# seconds between WARNING lines about failed batches of one pool (the others go to DEBUG): a client can make its own
# requests fail in the module as often as it sends them, and each caller gets its error anyway
FAILED_BATCH_LOG_INTERVAL = 10.0


class Runtime(threading.Thread):
    """
    Runs the batches of all pools of ``module_backends`` in one thread, fullest-waiting / oldest first.

    Call ``run()`` in the current thread or ``start()`` it in the background; ``ready`` is set while it serves.

    :param module_backends: {uid: ModuleBackend}; their ``get_pools()`` are served
    :param prefetch_batches: kept for compatibility; each pool forms up to its own ``prefetch_batches`` ahead
    :param sender_threads: threads that hand outputs back to the pools (splitting them per task, copying them to
      the CPU), so that the next batch starts meanwhile
    :param device: if given, modules are moved there at start and every batch is moved there before processing
    :param stats_report_interval: if given, log throughput per pool every this many seconds
    """

    def __init__(
        self,
        module_backends: Dict[str, object],
        prefetch_batches: int = 64,
        sender_threads: int = 1,
        device: Optional[torch.device] = None,
        stats_report_interval: Optional[float] = None,
    ):
        super().__init__(name="Runtime", daemon=True)
        if sender_threads < 1:
            raise ValueError(f"sender_threads must be at least 1, got {sender_threads}")
        self.module_backends = module_backends
        self.pools = tuple(pool for backend in module_backends.values() for pool in backend.get_pools())
        self.prefetch_batches, self.sender_threads = prefetch_batches, sender_threads
        self.device, self.stats_report_interval = device, stats_report_interval
        self.ready = mp.Event()
        self._shutdown_requested = threading.Event()
        self._wake_receiver, self._wake_sender = mp.Pipe(duplex=False)
        self._pipe_lock = threading.RLock()  # orders run() taking the wake pipe against shutdown() closing it
        self._closing_pipes = False  # set by the first shutdown() (reentrant: a signal handler may call it again)
        self._serving = False  # run() owns the wake receiver and closes it when it returns
        self.stats = _Stats()
        self._failed_batch_logs: Dict[str, ThrottledLog] = {}  # by pool name

    def run(self):
        """Serve batches until shutdown() (blocking)."""
        with self._pipe_lock:
            if self._shutdown_requested.is_set():
                return  # shut down before it ran: the pipe is closed already
            self._serving = True
        try:
            self._serve()
        finally:
            with self._pipe_lock:
                self._serving = False
                self._wake_receiver.close()

    def _serve(self) -> None:
        pools: Sequence = tuple(dict.fromkeys(self.pools))  # a pool shared by several backends is served once
        for pool in pools:
            _ensure_started(pool)
        for backend in self.module_backends.values() if self.device is not None else ():
            move_to = getattr(backend, "move_to", None)  # (a backend of another kind: its module only)
            move_to(self.device) if move_to is not None else backend.module.to(self.device)

        reporter = (
            None
            if self.stats_report_interval is None
            else threading.Thread(target=self._report_stats, name="Runtime.stats", daemon=True)
        )
        if reporter is not None:
            self.stats.since = time.perf_counter()  # the first report covers the time spent serving
            reporter.start()
        senders = ThreadPoolExecutor(self.sender_threads, thread_name_prefix="Runtime.sender")
        try:
            with selectors.DefaultSelector() as selector:
                for pool in pools:
                    try:
                        selector.register(pool.batch_receiver, selectors.EVENT_READ, pool)
                    except (OSError, ValueError) as e:  # its pipe is closed: it was shut down on its own
                        logger.warning(f"Runtime: pool {pool.name} is shut down ({e!r}); its tasks will not be served")
                selector.register(self._wake_receiver, selectors.EVENT_READ, None)
                self.ready.set()
                logger.info("Started")
                while not self._shutdown_requested.is_set():
                    ready_pools = [key.data for key, _ in selector.select(_SELECT_INTERVAL) if key.data is not None]
                    if self._shutdown_requested.is_set():
                        break
                    if ready_pools:
                        self._process_one_batch(min(ready_pools, key=lambda pool: pool.priority), senders)
        finally:
            self.ready.clear()
            senders.shutdown(wait=True)
            self._shutdown_requested.set()
            if reporter is not None:
                reporter.join()

    def _process_one_batch(self, pool, senders: ThreadPoolExecutor) -> None:
        try:
            batch_index, batch = pool.load_batch_to_runtime(timeout=None, device=self.device)
        except AbandonedBatchError as e:  # its callers went away: nothing to compute
            logger.debug(f"Runtime: skipped a batch of {pool.name}: {e}")
            return
        except Exception as e:
            logger.warning(f"Runtime: could not load a batch from {pool.name}: {e!r}")
            return
        batch_size = _batch_size(batch)
        started = time.perf_counter()
        try:
            outputs, examples = self.process_batch(pool, batch_index, *batch)
        except Exception as e:
            self._failed_batch_log(pool.name).log(
                f"Runtime: a batch of {batch_size} examples failed in {pool.name}: {e!r}"
            )
            logger.debug("Details:", exc_info=True)
            pool.send_exception_from_runtime(batch_index, e)
            return
        except BaseException as e:
            pool.send_exception_from_runtime(batch_index, RuntimeError(f"the server stopped: {e!r}"))
            raise
        self.stats.record(pool.name, examples, time.perf_counter() - started)
        senders.submit(_send_outputs, pool, batch_index, outputs)

    def process_batch(self, pool, batch_index: int, *batch: torch.Tensor) -> Tuple[Any, int]:
        """Compute one batch of ``pool`` with its ``process_func``; returns ``(outputs, batch size)``. The serving loop
        calls it for every batch, then hands the outputs back to the pool: a subclass may override it."""
        return pool.process_func(*batch), _batch_size(batch)

    def _failed_batch_log(self, pool_name: str) -> ThrottledLog:
        """Where the failed batches of a pool are logged: at WARNING at most once per FAILED_BATCH_LOG_INTERVAL."""
        if pool_name not in self._failed_batch_logs:
            self._failed_batch_logs[pool_name] = ThrottledLog(logger, logging.WARNING, FAILED_BATCH_LOG_INTERVAL)
        return self._failed_batch_logs[pool_name]

    def shutdown(self, timeout: Optional[float] = None):
        """Stop serving (after the batch being processed), stop the pools and wait for the thread.

        Closes the runtime's and the pools' pipes; safe to call several times, and on a runtime that never ran.
        """
        with self._pipe_lock:
            self._shutdown_requested.set()
            if not self._closing_pipes:  # (a call from a signal handler that interrupted this leaves them to it)
                self._closing_pipes = True
                try:
                    self._wake_sender.send_bytes(b"")
                except OSError:
                    pass
                self._wake_sender.close()
                if not self._serving:
                    self._wake_receiver.close()  # run() never took it (or already closed it)
        for pool in self.pools:
            pool.shutdown()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        self.ready.clear()

    def _report_stats(self):
        while not self._shutdown_requested.wait(self.stats_report_interval):
            for line in self.stats.report_and_reset():
                logger.info(line)


def _ensure_started(pool) -> None:
    if pool.is_alive():
        return
    try:
        pool.start()
    except RuntimeError as e:  # a thread / process can be started only once
        logger.warning(f"Runtime: pool {pool.name} cannot be started again ({e}); its tasks will not be served")
        return
    # our pools are threads of this process (a pool that is a process of its own has a pid)
    logger.info(f"{pool.name} starting, pid={getattr(pool, 'pid', None) or os.getpid()}")


def _batch_size(batch: Sequence[torch.Tensor]) -> int:
    return len(batch[0]) if batch and batch[0].ndim > 0 else 0


def _send_outputs(pool, batch_index: int, outputs) -> None:
    try:
        pool.send_outputs_from_runtime(batch_index, outputs)
    except Exception as e:
        logger.warning(f"Runtime: could not hand the outputs of a batch back to {pool.name}: {e!r}")
        try:
            pool.send_exception_from_runtime(batch_index, e)
        except Exception:
            pass


class _Stats:
    """Batches, examples and processing time per pool since the last report."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches, self.examples, self.seconds = defaultdict(int), defaultdict(int), defaultdict(float)
        self.since = time.perf_counter()

    def record(self, pool_name: str, batch_size: int, seconds: float) -> None:
        with self.lock:
            self.batches[pool_name] += 1
            self.examples[pool_name] += batch_size
            self.seconds[pool_name] += seconds

    def report_and_reset(self) -> List[str]:
        """Log lines: ``Processed <k> batches in last <t> seconds:``, one line per pool that processed batches
        (batches, examples, their rates and the mean batch size), and how much of the time went to computing."""
        with self.lock:
            elapsed = max(time.perf_counter() - self.since, 1e-9)
            total_batches, total_busy = sum(self.batches.values()), sum(self.seconds.values())
            lines = [f"Processed {total_batches} batches in last {elapsed:.2f} seconds:"]
            for name in sorted(self.batches):
                batches, examples = self.batches[name], self.examples[name]
                lines.append(
                    f"{name}: {batches} batches ({_rate(batches, elapsed, 'batch')}), {examples} examples "
                    f"({_rate(examples, elapsed, 'example')}), avg batch size {examples / batches:.2f}"
                )
            if total_batches:  # near 100%: the device is the bottleneck; far below: the time goes around it
                total_examples = sum(self.examples.values())
                lines.append(
                    f"Runtime: computing {total_busy / elapsed:.0%} of the time, "
                    f"{total_examples / max(total_busy, 1e-9):.1f} examples/s while computing"
                )
            self.batches.clear()
            self.examples.clear()
            self.seconds.clear()
            self.since = time.perf_counter()
            return lines


def _rate(count: int, seconds: float, unit: str) -> str:
    """``<x> <unit>es/s`` when there is at least one per second, else ``<x> s/<unit>``."""
    plural = unit + ("es" if unit.endswith("ch") else "s")
    if count == 0:
        return f"0.00 {plural}/s"
    per_second = count / seconds
    return f"{per_second:.2f} {plural}/s" if per_second >= 1 else f"{seconds / count:.2f} s/{unit}"
