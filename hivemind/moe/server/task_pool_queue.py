"""The waiting tasks of a TaskPool and the helpers that complete their futures.

A task leaves the queue as soon as its future is cancelled (its caller went away: the connection handler cancels it,
or the hub of task_pool_ipc.py does when a handler process disconnects): the pool registers a done callback that
removes it, so that cancelled tasks never count toward ``pool_size`` or ``min_batch_size`` and their tensors are
freed at once instead of when the pool reaches them. Removal is O(1): the queue is an ordered dict keyed by a
per-pool task number. Everything here runs in the process that owns the pool.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from hivemind.utils.futures import complete, fail

__all__ = ["PendingTasks", "Task", "Batch", "claim", "complete", "fail", "fail_tasks"]


@dataclass
class Task:
    future: concurrent.futures.Future
    tensors: Sequence[torch.Tensor]
    size: int
    signature: tuple  # (dtype, per-example shape, device) of every tensor: only equal signatures share a batch
    arrival_time: float
    key: int = -1  # its place in PendingTasks


@dataclass
class Batch:
    index: int
    tasks: List[Task]
    inputs: Sequence[torch.Tensor]
    size: int
    arrival_time: float


class PendingTasks:
    """Tasks waiting for a batch, oldest first, with the number of examples they hold. Not thread-safe: the pool
    calls it under its lock."""

    def __init__(self):
        self._tasks: OrderedDict[int, Task] = OrderedDict()
        self._keys = itertools.count()
        self.examples = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def append(self, task: Task) -> int:
        task.key = next(self._keys)
        self._tasks[task.key] = task
        self.examples += task.size
        return task.key

    def remove(self, key: int) -> Optional[Task]:
        """Drop the task with this key if it is still waiting (its caller went away)."""
        task = self._tasks.pop(key, None)
        if task is not None:
            self.examples -= task.size
        return task

    def first(self) -> Task:
        return next(iter(self._tasks.values()))

    def clear(self) -> None:
        self._tasks.clear()
        self.examples = 0

    def take(self, max_examples: int, signature: Optional[tuple] = None, running: bool = False) -> List[Task]:
        """Remove and return the oldest tasks that fit together: same signature (the first task's, if None), at most
        ``max_examples`` examples in all (the first task of a new batch always fits: it was checked on arrival).
        Stops at the first task that does not fit, so that tasks are batched in arrival order. Tasks done meanwhile
        (cancelled, failed elsewhere) are dropped; with ``running``, taken tasks are marked running as they are
        taken (those that cannot be are dropped too)."""
        tasks, examples = [], 0
        while self._tasks:
            task = self.first()
            if task.future.done():
                self.remove(task.key)
                continue
            if signature is not None and (task.signature != signature or examples + task.size > max_examples):
                break
            self.remove(task.key)
            if running and not claim(task.future):
                continue
            signature = task.signature
            tasks.append(task)
            examples += task.size
        return tasks


def claim(future: concurrent.futures.Future) -> bool:
    """Mark a task running; False if it was cancelled (or is done already)."""
    if future.running():  # a task retried on its own after its batch failed
        return True
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # completed meanwhile (e.g. failed by a shutdown)
        return False


def fail_tasks(tasks: Sequence[Task], exception: BaseException) -> None:
    for task in tasks:
        fail(task.future, exception)
