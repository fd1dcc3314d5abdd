"""TaskPool: batching, splitting results back, refusals, cancellation and shutdown (all in one process)."""

import asyncio
import threading
import time

import pytest
import torch

from hivemind.moe.server.task_pool import TaskPool, TaskRejectedError


class Recorder:
    """A process_func that doubles its input and remembers every batch it saw."""

    def __init__(self):
        self.batches = []

    def __call__(self, *inputs):
        self.batches.append([tensor.clone() for tensor in inputs])
        return tuple(tensor * 2 for tensor in inputs)


def run_batches(pool: TaskPool, count: int, timeout: float = 5.0):
    """Act as a minimal runtime: process ``count`` ready batches of ``pool``."""
    for _ in range(count):
        index, inputs = pool.load_batch_to_runtime(timeout=timeout)
        pool.send_outputs_from_runtime(index, pool.process_func(*inputs))


@pytest.fixture
def make_pool():
    pools = []

    def make(process_func=None, **kwargs):
        kwargs.setdefault("max_batch_size", 16)
        pool = TaskPool(process_func or Recorder(), name=f"pool{len(pools)}", **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def test_tasks_from_many_callers_are_batched_and_split_back(make_pool):
    pool = make_pool(max_batch_size=10)
    tasks = [torch.full((size, 3), float(i)) for i, size in enumerate([3, 4, 2, 5, 1, 6])]
    futures = [pool.submit_task(task) for task in tasks]
    pool.start()
    run_batches(pool, 3)
    for task, future in zip(tasks, futures):
        (output,) = future.result(timeout=5)
        assert torch.equal(output, task * 2)
    sizes = [len(batch[0]) for batch in pool.process_func.batches]
    assert sizes == [9, 6, 6]  # whole tasks in arrival order, never over max_batch_size


def test_tasks_are_batched_from_threads(make_pool):
    pool = make_pool(max_batch_size=64, start=True)
    results = {}

    def client(i):
        results[i] = pool.submit_task(torch.full((2, 4), float(i)), torch.full((2,), float(-i))).result(timeout=10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    processed = 0
    while processed < 40:
        index, inputs = pool.load_batch_to_runtime(timeout=5)
        processed += len(inputs[0])
        pool.send_outputs_from_runtime(index, pool.process_func(*inputs))
    for thread in threads:
        thread.join(5)
    for i in range(20):
        assert torch.equal(results[i][0], torch.full((2, 4), 2.0 * i))
        assert torch.equal(results[i][1], torch.full((2,), -2.0 * i))


async def test_submit_task_is_awaitable(make_pool):
    pool = make_pool(start=True)
    future = pool.submit_task(torch.ones(2, 3))
    worker = threading.Thread(target=run_batches, args=(pool, 1))
    worker.start()
    (output,) = await asyncio.wrap_future(future)
    worker.join()
    assert torch.equal(output, torch.full((2, 3), 2.0))
    (output,), _ = await asyncio.gather(pool.submit_task(torch.ones(1, 3)), asyncio.to_thread(run_batches, pool, 1))
    assert torch.equal(output, torch.full((1, 3), 2.0))


@pytest.mark.parametrize(
    "tensors, message",
    [
        ((), "at least one tensor"),
        ((torch.zeros(0, 3),), "empty"),
        ((torch.zeros(17, 3),), "max_batch_size=16"),
        ((torch.zeros(2, 3), torch.zeros(3, 3)), "different batch sizes"),
        ((torch.tensor(1.0),), "scalar"),
        (("not a tensor",), "not a tensor"),
    ],
)
def test_bad_task_is_refused_at_once(make_pool, tensors, message):
    pool = make_pool()  # not even started: the refusal must not wait for anything
    future = pool.submit_task(*tensors)
    assert future.done()
    with pytest.raises(TaskRejectedError, match=message):
        future.result()


def test_tasks_of_different_shapes_are_never_batched_together(make_pool):
    pool = make_pool(max_batch_size=100)
    good1, odd, good2 = torch.ones(2, 3), torch.ones(2, 5), torch.ones(4, 3)
    futures = [pool.submit_task(t) for t in (good1, odd, good2)]
    pool.start()
    run_batches(pool, 3)
    assert [tuple(batch[0].shape) for batch in pool.process_func.batches] == [(2, 3), (2, 5), (4, 3)]
    for tensor, future in zip((good1, odd, good2), futures):
        assert torch.equal(future.result(timeout=5)[0], tensor * 2)


def test_cancelled_task_is_dropped(make_pool):
    pool = make_pool()
    cancelled = pool.submit_task(torch.full((3, 2), 7.0))
    kept = pool.submit_task(torch.full((1, 2), 1.0))
    assert cancelled.cancel()
    pool.start()
    run_batches(pool, 1)
    assert torch.equal(kept.result(timeout=5)[0], torch.full((1, 2), 2.0))
    assert [batch[0].tolist() for batch in pool.process_func.batches] == [[[1.0, 1.0]]]


def test_only_cancelled_tasks_form_no_batch(make_pool):
    pool = make_pool(start=True)
    for _ in range(3):
        pool.submit_task(torch.ones(1, 2)).cancel()
    with pytest.raises(TimeoutError):
        pool.load_batch_to_runtime(timeout=0.3)
    future = pool.submit_task(torch.ones(2, 2))
    run_batches(pool, 1)
    assert future.result(timeout=5)[0].shape == (2, 2)


def test_failed_batch_is_retried_task_by_task_and_fails_only_its_failing_task(make_pool):
    pool = make_pool()
    futures = [pool.submit_task(torch.full((1, 2), float(i))) for i in range(3)]
    pool.start()
    index, (inputs,) = pool.load_batch_to_runtime(timeout=5)
    assert len(inputs) == 3
    pool.send_exception_from_runtime(index, ValueError("expert exploded"))
    for _ in range(3):
        index, (inputs,) = pool.load_batch_to_runtime(timeout=5)
        assert len(inputs) == 1
        if inputs[0, 0] == 1:
            pool.send_exception_from_runtime(index, ValueError("expert exploded"))
        else:
            pool.send_outputs_from_runtime(index, (inputs * 2,))
    with pytest.raises(ValueError, match="expert exploded"):
        futures[1].result(timeout=5)
    assert [future.result(timeout=5)[0].tolist() for future in (futures[0], futures[2])] == [[[0, 0]], [[4, 4]]]


def test_outputs_without_the_batch_dimension_fail_the_tasks(make_pool):
    pool = make_pool(lambda x: x.sum(), start=True)
    future = pool.submit_task(torch.ones(3, 2))
    run_batches(pool, 1)
    with pytest.raises(RuntimeError, match="first dimension"):
        future.result(timeout=5)


def test_min_batch_size_waits_for_examples_until_timeout(make_pool):
    pool = make_pool(min_batch_size=4, timeout=0.5, start=True)
    first = pool.submit_task(torch.ones(1, 2))
    started = time.monotonic()
    index, inputs = pool.load_batch_to_runtime(timeout=5)
    assert time.monotonic() - started >= 0.4  # waited for more examples, then gave up
    pool.send_outputs_from_runtime(index, pool.process_func(*inputs))
    assert first.result(timeout=5)[0].shape == (1, 2)

    futures = [pool.submit_task(torch.ones(2, 2)) for _ in range(2)]
    index, inputs = pool.load_batch_to_runtime(timeout=0.4)  # 4 examples: due at once
    assert len(inputs[0]) == 4
    pool.send_outputs_from_runtime(index, pool.process_func(*inputs))
    assert all(future.result(timeout=5)[0].shape == (2, 2) for future in futures)


def test_full_pool_refuses_new_tasks(make_pool):
    pool = make_pool(pool_size=2)
    waiting = [pool.submit_task(torch.ones(1, 2)) for _ in range(2)]
    refused = pool.submit_task(torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="already waiting"):
        refused.result(timeout=1)
    assert not any(future.done() for future in waiting)


def test_shutdown_fails_waiting_tasks(make_pool):
    pool = make_pool(start=True)
    future = pool.submit_task(torch.ones(1, 2))
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        future.result(timeout=5)
    assert not pool.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit_task(torch.ones(1, 2)).result(timeout=5)


def test_priority_is_the_arrival_of_the_oldest_ready_batch(make_pool):
    pool = make_pool(start=True)
    assert pool.priority == float("inf") and pool.empty
    before = time.monotonic()
    pool.submit_task(torch.ones(1, 2))
    assert pool.batch_receiver.poll(5)  # readable once the batch is formed
    assert not pool.empty
    assert before <= pool.priority <= time.monotonic()


def test_a_busy_pools_next_batch_counts_from_when_its_previous_one_was_taken(make_pool):
    flooded, other = make_pool(max_batch_size=4), make_pool(max_batch_size=4)
    for _ in range(3):  # one caller's queue: a full batch each
        flooded.submit_task(torch.ones(4, 2))
    flooded.start()
    flooded.load_batch_to_runtime(timeout=5)  # the Runtime takes the first; the second is formed meanwhile
    other.start()
    other.submit_task(torch.ones(1, 2))  # arrives after that, long after the flooded pool's waiting tasks
    assert flooded.batch_receiver.poll(5) and other.batch_receiver.poll(5)
    assert flooded.priority < other.priority  # the flooded pool's next batch goes first (it was formed first) ...
    flooded.load_batch_to_runtime(timeout=5)
    assert flooded.batch_receiver.poll(5)
    assert other.priority < flooded.priority  # ... then the other pool's, before the rest of the queue (before: last)
