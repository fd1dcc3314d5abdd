"""PendingTasks forms batches taking the owners' oldest tasks in turn (no I/O: tasks are built by hand)."""

import concurrent.futures
from typing import List

import torch

from hivemind.moe.server.task_pool_queue import PendingTasks, Task

SIGNATURE = ((torch.float32, (3,), torch.device("cpu")),)


def add(pending: PendingTasks, owner, size: int, signature=SIGNATURE) -> Task:
    task = Task(concurrent.futures.Future(), (torch.zeros(size, 3),), size, signature, 0.0, owner=owner)
    pending.append(task)
    return task


def names(tasks: List[Task], named: dict) -> List[str]:
    return [named[id(task)] for task in tasks]


def test_a_late_owner_waits_one_batch_behind_a_flood_of_full_tasks():
    pending, named = PendingTasks(), {}
    for index in range(10):
        named[id(add(pending, "flood", 8))] = f"flood{index}"
    named[id(add(pending, "honest", 1))] = "honest"
    batches = [names(pending.take(8), named) for _ in range(4)]
    assert batches == [["flood0"], ["honest"], ["flood1"], ["flood2"]]  # before: the honest task came 11th
    assert len(pending) == 7 and pending.examples == 56


def test_owners_take_turns_within_a_batch_and_keep_their_own_order():
    pending, named = PendingTasks(), {}
    for index in range(4):
        named[id(add(pending, "a", 2))] = f"a{index}"
    for index in range(2):
        named[id(add(pending, "b", 1))] = f"b{index}"
    named[id(add(pending, None, 3))] = "local"
    assert names(pending.take(8), named) == ["a0", "b0", "local", "a1"]  # (b1 would make 9)
    # "a" began that batch: now "b" and the local callers go first
    assert names(pending.take(8), named) == ["b1", "a2", "a3"]
    assert len(pending) == 0 and pending.examples == 0


def test_an_owner_whose_oldest_task_does_not_fit_gives_nothing_more_to_the_batch():
    pending, named = PendingTasks(), {}
    named[id(add(pending, "a", 5))] = "a0"
    named[id(add(pending, "a", 1))] = "a1"  # would fit, but a's older task does not: a's order is kept
    named[id(add(pending, "b", 3))] = "b0"
    named[id(add(pending, "b", 1))] = "b1"
    assert names(pending.take(8), named) == ["a0", "b0"]
    assert names(pending.take(8), named) == ["b1", "a1"]


def test_a_single_owner_is_batched_in_arrival_order_up_to_the_first_task_that_does_not_fit():
    pending, named = PendingTasks(), {}
    other = ((torch.float16, (3,), torch.device("cpu")),)
    for index, (size, signature) in enumerate([(3, SIGNATURE), (4, SIGNATURE), (2, other), (1, SIGNATURE)]):
        named[id(add(pending, None, size, signature))] = f"t{index}"
    assert names(pending.take(16), named) == ["t0", "t1"]
    assert names(pending.take(16), named) == ["t2"]
    assert names(pending.take(16), named) == ["t3"]


def test_cancelled_tasks_are_removed_at_once_and_skipped_without_costing_their_owner_its_turn():
    pending, named = PendingTasks(), {}
    first = add(pending, "a", 2)
    named[id(add(pending, "a", 2))] = "a1"
    named[id(add(pending, "b", 2))] = "b0"
    gone = add(pending, "b", 2)
    assert pending.remove(gone.key) is gone and len(pending) == 3 and pending.examples == 6
    first.future.cancel()  # done but still queued: take drops it
    assert names(pending.take(8), named) == ["a1", "b0"]
    assert len(pending) == 0 and pending.examples == 0


def test_refilling_a_batch_takes_only_tasks_of_its_signature_and_marks_them_running():
    pending, named = PendingTasks(), {}
    other = ((torch.float16, (3,), torch.device("cpu")),)
    named[id(add(pending, "a", 2, other))] = "a0"
    named[id(add(pending, "b", 2))] = "b0"
    cancelled = add(pending, "c", 1)
    cancelled.future.cancel()
    named[id(add(pending, "c", 1))] = "c1"
    refill = pending.take(3, SIGNATURE, running=True)
    assert names(refill, named) == ["b0", "c1"]
    assert all(task.future.running() for task in refill)
    assert len(pending) == 1 and pending.first().owner == "a"
