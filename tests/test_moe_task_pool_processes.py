"""TaskPool.submit_task from other processes (a forked child, a spawned child that got the pool by pickling)."""

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time

import pytest
import torch

from hivemind.moe.server.task_pool import TaskPool


def _double(*inputs):
    return tuple(tensor * 2 for tensor in inputs)


def _serve(pool: TaskPool, stop: threading.Event):
    """A minimal runtime for one pool, in a thread of the owner process."""
    while not stop.is_set():
        try:
            index, inputs = pool.load_batch_to_runtime(timeout=0.1)
        except TimeoutError:
            continue
        except Exception:
            return
        pool.send_outputs_from_runtime(index, pool.process_func(*inputs))


@pytest.fixture
def served_pool():
    pool = TaskPool(_double, max_batch_size=32, name="remote_test_pool", start=True)
    stop = threading.Event()
    server = threading.Thread(target=_serve, args=(pool, stop), daemon=True)
    server.start()
    yield pool
    stop.set()
    pool.shutdown()
    server.join(5)


def _submit_in_child(pool: TaskPool, connection):
    try:
        futures = [pool.submit_task(torch.full((i + 1, 3), float(i)), torch.arange(i + 1)) for i in range(5)]
        results = [[tensor.tolist() for tensor in future.result(timeout=30)] for future in futures]
        refused = pool.submit_task(torch.zeros(40, 3), torch.zeros(40))  # over max_batch_size: refused in the child
        connection.send((os.getpid(), results, repr(refused.exception(timeout=5))))
    except BaseException as e:
        connection.send((os.getpid(), None, repr(e)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_tasks_submitted_from_another_process(served_pool, start_method):
    context = mp.get_context(start_method)
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_submit_in_child, args=(served_pool, sender), daemon=True)
    child.start()
    assert receiver.poll(45), "the child did not report"
    child_pid, results, refusal = receiver.recv()
    child.join(10)
    assert child_pid != os.getpid()
    assert results is not None, refusal
    for i, (values, indices) in enumerate(results):
        assert values == [[2.0 * i] * 3] * (i + 1)
        assert indices == [2 * k for k in range(i + 1)]
    assert "max_batch_size=32" in refusal


def test_pool_unpickled_in_its_own_process_is_the_same_object(served_pool):
    assert pickle.loads(pickle.dumps(served_pool)) is served_pool


def _fork_submitter(pool: TaskPool, target, tasks: int):
    """Run ``target(pool, connection)`` in a forked child; (child, receiver) once ``tasks`` of its tasks wait."""
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=target, args=(pool, sender), daemon=True)
    child.start()
    assert receiver.poll(10) and receiver.recv() == "submitted"
    deadline = time.monotonic() + 10
    while len(pool._pending) < tasks and time.monotonic() < deadline:  # the tasks are on their way to this process
        time.sleep(0.01)
    return child, receiver


def _submit_and_hang(pool: TaskPool, connection):
    pool.submit_task(torch.full((2, 3), 5.0), torch.zeros(2))
    connection.send("submitted")
    time.sleep(60)


@pytest.mark.timeout(30)
def test_task_of_a_process_that_died_is_dropped():
    seen = []
    pool = TaskPool(lambda *inputs: (seen.append(inputs[0].clone()), _double(*inputs))[1], 32, "dropping_pool")
    try:
        child, _ = _fork_submitter(pool, _submit_and_hang, tasks=1)
        assert len(pool._pending) == 1
        remote_future = pool._pending.first().future
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        deadline = time.monotonic() + 10
        while not remote_future.cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert remote_future.cancelled(), "the pool should cancel the tasks of a process that went away"

        pool.start()
        kept = pool.submit_task(torch.ones(1, 3), torch.ones(1))
        index, inputs = pool.load_batch_to_runtime(timeout=5)
        pool.send_outputs_from_runtime(index, pool.process_func(*inputs))
        assert torch.equal(kept.result(timeout=5)[0], torch.full((1, 3), 2.0))
        assert len(seen) == 1 and seen[0].shape == (1, 3)  # the dead process's task was never computed
    finally:
        pool.shutdown()


def _submit_after_owner_exit(pool: TaskPool, connection):
    future = pool.submit_task(torch.ones(1, 3), torch.ones(1))
    connection.send(repr(future.exception(timeout=20)))


@pytest.mark.timeout(30)
def test_client_gets_an_error_when_the_owner_shuts_the_pool_down(served_pool):
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    served_pool.shutdown()  # the pool is gone but this process lives on
    child = context.Process(target=_submit_after_owner_exit, args=(served_pool, sender), daemon=True)
    child.start()
    assert receiver.poll(25)
    assert "shut down" in receiver.recv()
    child.join(10)


def _submit_for_two_owners(pool: TaskPool, connection):
    futures = [pool.submit_task(torch.full((32, 3), 1.0), torch.zeros(32), owner="flood") for _ in range(4)]
    futures.append(pool.submit_task(torch.full((1, 3), 7.0), torch.zeros(1), owner="honest"))
    connection.send("submitted")
    for future in futures:
        future.result(timeout=20)
    connection.send("done")


@pytest.mark.timeout(30)
def test_the_owner_of_a_task_travels_with_it_from_another_process():
    seen = []
    pool = TaskPool(lambda *inputs: (seen.append(inputs[0][0, 0].item()), _double(*inputs))[1], 32, "owners_pool")
    try:
        child, receiver = _fork_submitter(pool, _submit_for_two_owners, tasks=5)
        assert [task.owner for task in pool._pending] == ["flood"] * 4 + ["honest"]
        pool.start()
        for _ in range(5):
            index, inputs = pool.load_batch_to_runtime(timeout=5)
            pool.send_outputs_from_runtime(index, pool.process_func(*inputs))
        assert receiver.poll(10) and receiver.recv() == "done"
        child.join(10)
        assert seen == [1.0, 7.0, 1.0, 1.0, 1.0]  # the honest task waits one batch, not the whole flood
    finally:
        pool.shutdown()
