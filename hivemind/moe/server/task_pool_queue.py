"""The waiting tasks of a TaskPool and the helpers that complete their futures.

A task leaves the queue as soon as its future is cancelled (its caller went away: the connection handler cancels it,
or the hub of task_pool_ipc.py does when a handler process disconnects): the pool registers a done callback that
removes it, so that cancelled tasks never count toward ``pool_size`` or ``min_batch_size`` and their tensors are
freed at once instead of when the pool reaches them. Removal is O(1): the queue is an ordered dict keyed by a
per-pool task number (and each owner's own tasks another one). Everything here runs in the process that owns the pool.

Fairness. Every task has an owner (the peer id of the caller that sent it; None for local or anonymous callers, who
share one turn). A batch takes the owners' oldest tasks in turn, and the owner whose task began a batch goes to the
back of the turns, so one caller with a long queue of large tasks costs another caller about one batch, not its whole
queue. Within one owner, tasks keep their arrival order.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable, Iterator, List, Optional, Sequence

import torch

from hivemind.utils.futures import complete, fail

__all__ = ["PendingTasks", "Task", "Batch", "claim", "complete", "fail", "fail_tasks"]

# owners whose oldest task does not fit a batch before it is closed: a few fill it almost as well as any number (93%
# of 1024 examples on average with 16 callers of 100-700 rows, as with no limit), and looking at every waiting caller
# for every batch cost 2.6 ms per batch with 4000 callers, 10.6 s of the pool's lock to serve them once
MAX_OWNERS_LEFT_OUT = 16


@dataclass
class Task:
    future: concurrent.futures.Future
    tensors: Sequence[torch.Tensor]
    size: int
    signature: tuple  # (dtype, per-example shape, device) of every tensor: only equal signatures share a batch
    arrival_time: float
    key: int = -1  # its place in PendingTasks
    owner: Hashable = None  # who sent it (a caller's peer id); None: a local or anonymous caller


@dataclass
class Batch:
    index: int
    tasks: List[Task]
    inputs: Sequence[torch.Tensor]
    size: int
    priority: float  # the Runtime takes the pools' batches smallest first (see TaskPool.priority)


class PendingTasks:
    """Tasks waiting for a batch, oldest first and per owner, with the number of examples they hold. Not thread-safe:
    the pool calls it under its lock."""

    def __init__(self):
        self._tasks: OrderedDict[int, Task] = OrderedDict()
        self._owners: OrderedDict[Hashable, OrderedDict[int, Task]] = OrderedDict()  # in the order of their turns
        self._keys = itertools.count()
        self.examples = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def append(self, task: Task) -> int:
        task.key = next(self._keys)
        self._tasks[task.key] = task
        self._owners.setdefault(task.owner, OrderedDict())[task.key] = task  # a new owner's turn comes last
        self.examples += task.size
        return task.key

    def remove(self, key: int) -> Optional[Task]:
        """Drop the task with this key if it is still waiting (its caller went away)."""
        task = self._tasks.pop(key, None)
        if task is not None:
            self.examples -= task.size
            own = self._owners[task.owner]
            del own[key]
            if not own:
                del self._owners[task.owner]
        return task

    def first(self) -> Task:
        """The oldest task of all owners."""
        return next(iter(self._tasks.values()))

    def clear(self) -> None:
        self._tasks.clear()
        self._owners.clear()
        self.examples = 0

    def take(self, max_examples: int, signature: Optional[tuple] = None, running: bool = False) -> List[Task]:
        """Remove and return tasks that fit together: same signature (the first task's, if None), at most
        ``max_examples`` examples in all (the first task of a new batch always fits: it was checked on arrival).
        Owners take turns, each giving its oldest task; an owner whose oldest task does not fit gives none more to this
        batch, so that each owner's tasks are batched in arrival order, and after ``MAX_OWNERS_LEFT_OUT`` such owners
        the batch is closed (so that forming it costs about its own tasks, not a scan of every waiting caller). The
        owner whose task came first goes to the back of the turns. Tasks done meanwhile (cancelled, failed elsewhere)
        are dropped; with ``running``, taken tasks are marked running as they are taken (those that cannot be are
        dropped too)."""
        tasks, examples, leader, left_out = [], 0, _NO_OWNER, 0
        # each owner's first turn adds an example or leaves it out: the others cannot be reached in this batch
        turns = deque(itertools.islice(self._owners, max_examples + MAX_OWNERS_LEFT_OUT))
        while turns and examples < max_examples and left_out < MAX_OWNERS_LEFT_OUT:
            owner = turns.popleft()
            own = self._owners.get(owner)
            if own is None:  # its last tasks were done meanwhile
                continue
            task = next(iter(own.values()))
            if signature is not None and not task.future.done():
                if task.signature != signature or examples + task.size > max_examples:
                    left_out += 1
                    continue  # this owner gives nothing more to this batch
            self.remove(task.key)
            if task.future.done() or (running and not claim(task.future)):
                turns.appendleft(owner)  # dropped: still its turn
                continue
            if leader is _NO_OWNER:
                leader = owner
            signature = task.signature
            tasks.append(task)
            examples += task.size
            turns.append(owner)
        if leader in self._owners:
            self._owners.move_to_end(leader)
        return tasks


_NO_OWNER = object()


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
