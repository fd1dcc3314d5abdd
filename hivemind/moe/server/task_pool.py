"""TaskPool: gathers tasks (tuples of batch-first tensors) from many callers into batches for the Runtime.

Where things run. A pool is a thread of the process that created it, the *owner*, which is where the Runtime
computes. ``submit_task(*tensors)`` works from any process and always returns an MPFuture created in the calling
process, so the caller can ``await`` it (or ``asyncio.wrap_future`` it) in its own event loop:
- in the owner process (connection handlers running as threads or asyncio tasks there) the task is queued directly:
  no copy, no pickling;
- in another process (a handler forked from the owner, or one that received the pool by pickling under spawn) the
  tensors travel over a local socket to the owner, one copy each way (see task_pool_ipc.py).

Batching. The pool thread forms batches ahead of the Runtime (at most ``prefetch_batches`` waiting), taking the
oldest task of each caller in turn (``owner``, see task_pool_queue.py: one caller's flood delays another by about one
batch, not by its whole queue): a batch holds whole tasks, at most ``max_batch_size`` examples, and only tasks whose
tensors have the same count, dtypes and per-example shapes as the first one (a task that does not fit starts the next
batch instead, so it can never break the concatenation of others). It waits for ``min_batch_size`` examples, or
``timeout`` seconds after the oldest task arrived if ``timeout`` is set. Outputs of a batch are split back along the
first dimension.
A batch of several tasks whose computation fails is retried one task at a time, so that only the failing task fails.

Refused at once (the future holds the error, nothing is queued): a task without tensors, an empty task (batch size
0), tensors with different batch sizes, a task over ``max_batch_size`` and, when ``pool_size`` is set, a task that
finds that many tasks already waiting. A task whose future is cancelled (its client went away) before the Runtime
takes its batch is dropped: a waiting one leaves the queue at once (it never counts toward ``pool_size`` or
``min_batch_size``; see task_pool_queue.py), one of a formed batch is left out of it and its room goes to the oldest
waiting tasks that fit, and a batch with no task left is not computed at all. Shutting a pool down fails every task
it still holds.

Runtime protocol (as petals' pools): ``batch_receiver`` readable while a batch is ready, ``priority`` (arrival of the
oldest ready batch, or when the Runtime took the previous one if later; smaller first), ``load_batch_to_runtime``,
``send_outputs/exception_from_runtime``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from functools import partial
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from hivemind.moe.server.task_pool_ipc import (
    PoolEndpoint,
    get_local_pool,
    register_pool,
    submit_remote_task,
    unregister_pool,
)
from hivemind.moe.server.task_pool_queue import Batch, PendingTasks, Task, claim, complete, fail, fail_tasks
from hivemind.utils.logging import get_logger
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.process_handle import close_in_other_children
from hivemind.utils.value_checks import is_count

__all__ = ["TaskPoolBase", "TaskPool", "TaskRejectedError", "AbandonedBatchError", "SkippedUpdateError"]

logger = get_logger(__name__)


class TaskRejectedError(ValueError):
    """A task that a pool cannot take as it is (empty, too large, inconsistent batch sizes, pool full)."""


class AbandonedBatchError(RuntimeError):
    """Every task of a formed batch was cancelled before the Runtime took it: there is nothing to compute."""


class SkippedUpdateError(RuntimeError):
    """Raised by a process_func whose ``outputs`` are valid but that skipped a side effect of the batch (the update of
    an expert whose parameter gradients overflow): a batch of several tasks is retried one task at a time (so that
    one task cannot cost the others their side effect), a batch of one task gets the outputs."""

    def __init__(self, message: str, outputs: Sequence[torch.Tensor]):
        super().__init__(message)
        self.outputs = outputs

    def __reduce__(self):
        return type(self), (str(self), self.outputs)


class TaskPoolBase(threading.Thread):
    """What the Runtime expects of a pool; see TaskPool for the batching one."""

    def __init__(self, process_func: Callable[..., Any], daemon: bool = True, **kwargs):
        super().__init__(daemon=daemon, **kwargs)
        self.process_func = process_func

    def submit_task(self, *tensors: torch.Tensor, owner: Hashable = None) -> MPFuture:
        raise NotImplementedError()

    def load_batch_to_runtime(self, timeout: Optional[float] = None, device: Optional[torch.device] = None):
        raise NotImplementedError()

    def send_outputs_from_runtime(self, batch_index: int, batch_outputs: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError()

    def send_exception_from_runtime(self, batch_index: int, exception: BaseException) -> None:
        raise NotImplementedError()

    @property
    def empty(self) -> bool:
        raise NotImplementedError()

    @property
    def priority(self) -> float:
        raise NotImplementedError()


class TaskPool(TaskPoolBase):
    """Batches tasks for one function (e.g. one expert's forward) and returns each task's share of the outputs.

    :param process_func: called by the Runtime with the batched tensors; returns a tensor or a sequence of tensors,
      each with the batch as its first dimension
    :param max_batch_size: at most this many examples per batch; a larger task is refused
    :param name: pool name (thread name, logs)
    :param min_batch_size: wait for at least this many examples before forming a batch
    :param timeout: if set, form a batch anyway this many seconds after its oldest task arrived
    :param pool_size: if set, refuse new tasks while this many are waiting
    :param prefetch_batches: how many formed batches may wait for the Runtime
    :param daemon: the pool thread is a daemon thread
    :param start: start the pool thread now (the Runtime otherwise starts it)
    """

    def __init__(
        self,
        process_func: Callable[..., Any],
        max_batch_size: int,
        name: str,
        min_batch_size: int = 1,
        timeout: Optional[float] = None,
        pool_size: Optional[int] = None,
        prefetch_batches: int = 1,
        daemon: bool = True,
        start: bool = False,
    ):
        super().__init__(process_func, daemon=daemon, name=name)
        if not is_count(max_batch_size):
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        max_batch_size = int(max_batch_size)  # (a numpy integer too, as hivemind 1.1.12 accepts)
        if not 1 <= min_batch_size <= max_batch_size:
            raise ValueError(f"min_batch_size must be in [1, max_batch_size={max_batch_size}], got {min_batch_size}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be non-negative or None, got {timeout}")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be positive or None, got {pool_size}")
        if prefetch_batches < 1:
            raise ValueError(f"prefetch_batches must be at least 1, got {prefetch_batches}")
        self.max_batch_size, self.min_batch_size, self.timeout = max_batch_size, min_batch_size, timeout
        self.pool_size, self.prefetch_batches = pool_size, prefetch_batches
        self._owner_pid = os.getpid()
        # reentrant: a signal handler that calls Server.shutdown() may interrupt shutdown() inside this lock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pending = PendingTasks()  # a cancelled task leaves it at once (see _drop_if_cancelled)
        self._ready: Deque[Batch] = deque()
        self._in_flight: Dict[int, Batch] = {}
        self._last_loaded = -math.inf  # when the Runtime last took a batch (see priority)
        self._batch_indices = itertools.count()
        self._closed = False
        self.batch_receiver, self._batch_sender = mp.Pipe(duplex=False)  # one message per ready batch
        # a copy of the sender in a child forked from now on (e.g. a connection handler process) hid its closing from
        # a load_batch_to_runtime() waiting for a batch: shut down, the pool left it waiting forever
        close_in_other_children(self, ["batch_receiver", "_batch_sender"])
        self._endpoint: PoolEndpoint = register_pool(self)
        if start:
            self.start()

    # ------------------------------------------------------------------ submitting (any process)

    def submit_task(self, *tensors: torch.Tensor, owner: Hashable = None) -> MPFuture:
        """Queue one task; the future gets a tuple with this task's rows of every output (or the error).

        :param owner: who the task is for (the connection handler passes the caller's peer id; it must pickle):
          batches take the oldest task of each owner in turn. None (local callers) is one owner too.
        """
        future = MPFuture()
        try:
            size = self._check_task(tensors)
        except TaskRejectedError as e:
            future.set_exception(e)
            return future
        if os.getpid() == self._owner_pid:
            self._enqueue(future, tensors, size, owner)
        else:
            submit_remote_task(self._endpoint, future, tensors, owner)
        return future

    def get_task_size(self, tensors: Sequence[torch.Tensor]) -> int:
        """The number of examples in a task: the length of its first tensor."""
        return len(tensors[0]) if tensors and tensors[0].ndim > 0 else 0

    def _check_task(self, tensors: Sequence[torch.Tensor]) -> int:
        if not tensors:
            raise TaskRejectedError(f"{self.name}: a task needs at least one tensor, got none")
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TaskRejectedError(f"{self.name}: task input #{index} is a {type(tensor).__name__}, not a tensor")
            if tensor.ndim == 0:
                raise TaskRejectedError(f"{self.name}: task input #{index} is a scalar; inputs must be batch-first")
            if tensor.layout != torch.strided:
                raise TaskRejectedError(f"{self.name}: task input #{index} has layout {tensor.layout}, expected dense")
        size = self.get_task_size(tensors)
        if size == 0:
            raise TaskRejectedError(f"{self.name}: the task is empty (batch size 0); send at least one example")
        sizes = [len(tensor) for tensor in tensors]
        if any(other != size for other in sizes):
            raise TaskRejectedError(f"{self.name}: task inputs have different batch sizes {sizes}")
        if size > self.max_batch_size:
            raise TaskRejectedError(
                f"{self.name}: the task has {size} examples, over max_batch_size={self.max_batch_size}; split it"
            )
        return size

    def _accept_task(
        self, future: concurrent.futures.Future, tensors: Sequence[torch.Tensor], owner: Hashable
    ) -> None:
        """A task that arrived from another process (called by the hub in the owner process)."""
        try:
            size = self._check_task(tensors)
        except TaskRejectedError as e:
            future.set_exception(e)
            return
        self._enqueue(future, tensors, size, owner)

    def _enqueue(
        self, future: concurrent.futures.Future, tensors: Sequence[torch.Tensor], size: int, owner: Hashable
    ) -> None:
        signature = tuple((tensor.dtype, tuple(tensor.shape[1:]), tensor.device) for tensor in tensors)
        task = Task(future, tuple(tensors), size, signature, time.monotonic(), owner=owner)
        error = None
        with self._lock:
            if self._closed:
                error = RuntimeError(f"{self.name}: the task pool is shut down")
            elif self.pool_size is not None and len(self._pending) >= self.pool_size:
                error = RuntimeError(f"{self.name}: {self.pool_size} tasks are already waiting; try again later")
            else:
                key = self._pending.append(task)
                self._changed.notify()
        if error is not None:
            return fail(future, error)
        future.add_done_callback(partial(self._drop_if_cancelled, key))  # (runs at once if cancelled already)

    def _drop_if_cancelled(self, key: int, future: concurrent.futures.Future) -> None:
        """A task's future is done: if it was cancelled while waiting, forget the task now (and its tensors)."""
        if future.cancelled():
            with self._lock:
                if self._pending.remove(key) is not None:
                    self._changed.notify()  # the oldest task may have changed, and with it the batch timeout

    # ------------------------------------------------------------------ forming batches (pool thread)

    def run(self):
        if os.getpid() != self._owner_pid:
            raise RuntimeError(f"{self.name}: a task pool can only run in the process that created it")
        while True:
            try:
                tasks = self._take_tasks()
                if tasks is None:
                    return
                if tasks:
                    self._form_batch(tasks)
            except Exception as e:  # the pool thread must outlive any single task
                logger.exception(f"{self.name}: unexpected error while forming a batch: {e!r}")

    def _batch_is_due(self, now: float) -> bool:
        if self._pending.examples >= self.min_batch_size:
            return True
        return self.timeout is not None and now >= self._pending.first().arrival_time + self.timeout

    def _take_tasks(self) -> Optional[List[Task]]:
        """Wait until a batch is due and there is room for it; take its tasks (None after shutdown)."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                if self._pending and len(self._ready) < self.prefetch_batches and self._batch_is_due(now):
                    break
                wait_for = None
                if self._pending and len(self._ready) < self.prefetch_batches and self.timeout is not None:
                    wait_for = max(0.0, self._pending.first().arrival_time + self.timeout - now)
                self._changed.wait(wait_for)

            return self._pending.take(self.max_batch_size)

    def _form_batch(self, tasks: List[Task]) -> None:
        try:
            if len(tasks) == 1:
                inputs = tasks[0].tensors
            else:
                inputs = [torch.cat(parts) for parts in zip(*(task.tensors for task in tasks))]
        except Exception as e:  # should not happen: all tasks have the same signature
            logger.warning(f"{self.name}: could not concatenate {len(tasks)} tasks: {e!r}")
            return fail_tasks(tasks, e)
        size, oldest = sum(task.size for task in tasks), min(task.arrival_time for task in tasks)
        with self._lock:
            if self._closed:
                fail_tasks(tasks, RuntimeError(f"{self.name}: the task pool is shut down"))
                return
            self._ready.append(Batch(next(self._batch_indices), tasks, inputs, size, max(oldest, self._last_loaded)))
            self._batch_sender.send_bytes(b"")

    # ------------------------------------------------------------------ Runtime side (owner process)

    @property
    def empty(self) -> bool:
        """True if no batch is ready for the Runtime."""
        try:
            return self._closed or not self.batch_receiver.poll()
        except (OSError, EOFError):  # closed by shutdown meanwhile
            return True

    @property
    def priority(self) -> float:
        """The arrival time of the oldest task of the oldest ready batch, or the time the Runtime took this pool's
        previous batch if that is later (the Runtime serves the smallest first). So busy pools take turns: a pool with
        a long queue (one caller's flood) does not keep the others waiting until all of its older tasks are done."""
        try:
            return self._ready[0].priority
        except IndexError:
            return math.inf

    def load_batch_to_runtime(
        self, timeout: Optional[float] = None, device: Optional[torch.device] = None
    ) -> Tuple[int, Sequence[torch.Tensor]]:
        """Take the next ready batch: ``(batch_index, inputs)``; inputs are moved to ``device`` if given.

        This is when its tasks start running (and can no longer be cancelled). Tasks cancelled since the batch was
        formed (their callers went away) are left out of it, and their room goes to the oldest waiting tasks that fit
        the batch; if no task of it is left, AbandonedBatchError is raised instead.
        """
        if os.getpid() != self._owner_pid:
            raise RuntimeError(f"{self.name}: batches can only be loaded in the process that created the pool")
        try:
            announced = self.batch_receiver.poll(timeout)
            if announced:
                self.batch_receiver.recv_bytes()
        except (OSError, EOFError):  # shutdown closed the pipe (a waiting poll sees the end of the closed sender)
            raise RuntimeError(f"{self.name}: the task pool is shut down") from None
        if not announced:
            raise TimeoutError(f"{self.name}: no batch became ready within {timeout} s")
        with self._lock:
            if not self._ready:  # shut down since the batch was announced
                raise RuntimeError(f"{self.name}: the task pool is shut down")
            batch = self._ready.popleft()
            self._last_loaded = time.monotonic()
            self._changed.notify()  # room for the next batch
            batch.tasks, formed_with = [task for task in batch.tasks if claim(task.future)], len(batch.tasks)
            changed = len(batch.tasks) < formed_with
            if changed and batch.tasks:  # refill the room of the cancelled tasks with waiting ones that fit
                room = self.max_batch_size - sum(task.size for task in batch.tasks)
                batch.tasks += self._pending.take(room, batch.tasks[0].signature, running=True)
            if batch.tasks:
                self._in_flight[batch.index] = batch
        if not batch.tasks:
            raise AbandonedBatchError(f"{self.name}: every caller of a batch of {formed_with} tasks went away")
        try:  # the tasks are running: a failure here (e.g. out of device memory) must complete them
            if changed:  # concatenate the tasks of the batch now (tasks are never cancelled once running)
                batch.size = sum(task.size for task in batch.tasks)
                batch.inputs = [torch.cat(parts) for parts in zip(*(task.tensors for task in batch.tasks))]
            inputs = batch.inputs if device is None else [t.to(device, non_blocking=True) for t in batch.inputs]
        except BaseException as e:
            self.send_exception_from_runtime(batch.index, e)
            raise
        return batch.index, inputs

    def send_outputs_from_runtime(self, batch_index: int, batch_outputs: Any) -> None:
        """Split the outputs of a batch along the first dimension and complete each task with its rows."""
        with self._lock:
            batch = self._in_flight.pop(batch_index, None)
        if batch is None:
            logger.debug(f"{self.name}: outputs for unknown batch {batch_index} (pool shut down?)")
            return
        outputs = (batch_outputs,) if isinstance(batch_outputs, torch.Tensor) else tuple(batch_outputs)
        for index, output in enumerate(outputs):
            if not isinstance(output, torch.Tensor) or output.ndim == 0 or len(output) != batch.size:
                shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                error = RuntimeError(
                    f"{self.name}: output #{index} of the batch is {shape}, expected a tensor with the batch "
                    f"({batch.size} examples) as its first dimension"
                )
                return fail_tasks(batch.tasks, error)
        outputs = tuple(
            output.detach() if output.device.type == "cpu" else output.detach().cpu() for output in outputs
        )
        if len(batch.tasks) == 1:
            return complete(batch.tasks[0].future, outputs)
        start = 0
        for task in batch.tasks:
            complete(task.future, tuple(output[start : start + task.size] for output in outputs))
            start += task.size

    def send_exception_from_runtime(self, batch_index: int, exception: BaseException) -> None:
        """Fail the tasks of a batch with ``exception``; a batch of several tasks is retried one task per batch first.

        Tasks that fit the schema can still fail the computation by their values (e.g. an out-of-range index for an
        embedding): retried alone, such a task fails by itself and the others of its batch get their results.
        """
        with self._lock:
            batch = self._in_flight.pop(batch_index, None)
            if batch is not None and len(batch.tasks) > 1 and not self._closed:
                retries = [
                    Batch(next(self._batch_indices), [task], task.tensors, task.size, batch.priority)
                    for task in batch.tasks
                ]
                self._ready.extendleft(reversed(retries))  # oldest first, ahead of newer batches
                for _ in retries:
                    self._batch_sender.send_bytes(b"")
                return
            if batch is not None and isinstance(exception, SkippedUpdateError):
                self._in_flight[batch_index] = batch  # (a single task: it gets the outputs)
        if batch is None:
            logger.debug(f"{self.name}: an error for unknown batch {batch_index} (pool shut down?): {exception!r}")
            return
        if isinstance(exception, SkippedUpdateError):
            return self.send_outputs_from_runtime(batch_index, exception.outputs)
        fail_tasks(batch.tasks, exception)

    # ------------------------------------------------------------------ lifetime

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop forming batches, fail every task still held (waiting, ready or being processed), close the pipe.

        Safe to call several times, and on a pool that was never started.
        """
        if os.getpid() != self._owner_pid:
            return  # a handle in another process: the pool itself belongs to its owner
        with self._lock:
            if self._closed:
                return
            self._closed = True
            tasks = list(self._pending) + [task for batch in self._ready for task in batch.tasks]
            tasks += [task for batch in self._in_flight.values() for task in batch.tasks]
            self._pending.clear()
            self._ready.clear()
            self._in_flight.clear()
            self._changed.notify_all()
            self._batch_sender.close()  # every send happens under the lock after checking _closed
        self.batch_receiver.close()  # its file descriptor is freed now, not whenever the garbage collector runs
        if os.getpid() == self._owner_pid:
            unregister_pool(self._endpoint)
        fail_tasks(tasks, RuntimeError(f"{self.name}: the task pool was shut down before the task was processed"))
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def terminate(self) -> None:
        """Alias of shutdown (pools of the original were processes)."""
        self.shutdown()

    def __reduce__(self):
        state = dict(
            process_func=None,
            max_batch_size=self.max_batch_size,
            name=self.name,
            min_batch_size=self.min_batch_size,
            timeout=self.timeout,
            pool_size=self.pool_size,
            prefetch_batches=self.prefetch_batches,
        )
        return _restore_pool, (self._endpoint, state)

    @classmethod
    def _remote_handle(cls, endpoint: PoolEndpoint, state: Dict[str, Any]) -> TaskPool:
        """A TaskPool object in another process that forwards ``submit_task`` to the owner."""
        handle = cls.__new__(cls)
        threading.Thread.__init__(handle, name=state["name"], daemon=True)
        for key, value in state.items():
            if key != "name":
                setattr(handle, key, value)
        handle._owner_pid, handle._endpoint, handle._closed = endpoint[3], endpoint, False
        return handle


def _restore_pool(endpoint: PoolEndpoint, state: Dict[str, Any]) -> TaskPool:
    local = get_local_pool(endpoint)
    return local if local is not None else TaskPool._remote_handle(endpoint, state)
