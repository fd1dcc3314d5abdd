"""Cancelled tasks (their callers went away) leave the pool at once: they never count toward ``pool_size`` or
``min_batch_size``, never keep their tensors alive, and a formed batch that lost some of them is refilled from the
queue, so that a burst of cancellations neither delays nor shrinks the batches of live callers."""

import gc
import multiprocessing as mp
import time
import weakref

import pytest
import torch

from hivemind.moe.server.task_pool import TaskPool


def doubled(*inputs):
    return tuple(tensor * 2 for tensor in inputs)


@pytest.fixture
def make_pool():
    pools = []

    def make(**kwargs):
        kwargs.setdefault("max_batch_size", 16)
        pool = TaskPool(doubled, name=f"cancelled_pool{len(pools)}", **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def run_one_batch(pool: TaskPool) -> torch.Tensor:
    index, (inputs,) = pool.load_batch_to_runtime(timeout=5)
    pool.send_outputs_from_runtime(index, doubled(inputs))
    return inputs


def test_cancelled_tasks_do_not_count_toward_pool_size(make_pool):
    pool = make_pool(pool_size=2)
    abandoned = [pool.submit_task(torch.ones(1, 3)) for _ in range(2)]
    assert all(future.cancel() for future in abandoned)
    live = pool.submit_task(torch.full((1, 3), 5.0))
    assert not live.done(), f"a live task was refused because of cancelled ones: {live.exception(0)!r}"
    pool.start()
    run_one_batch(pool)
    assert torch.equal(live.result(timeout=5)[0], torch.full((1, 3), 10.0))


def test_cancelled_task_releases_its_tensors_at_once(make_pool):
    pool = make_pool()
    tensor = torch.ones(4, 3)
    released = weakref.ref(tensor)
    future = pool.submit_task(tensor)
    del tensor
    assert future.cancel()
    gc.collect()
    assert released() is None, "the pool still holds the tensors of a cancelled task"
    assert not pool._pending


def test_cancelled_tasks_do_not_make_a_batch_due(make_pool):
    pool = make_pool(min_batch_size=4, start=True)
    abandoned = [pool.submit_task(torch.ones(1, 3)) for _ in range(3)]
    assert all(future.cancel() for future in abandoned)
    first = pool.submit_task(torch.full((1, 3), 1.0))
    # one live example of the four the batch waits for: no batch may form yet
    assert not pool.batch_receiver.poll(0.3), "cancelled tasks counted toward min_batch_size"
    others = [pool.submit_task(torch.full((1, 3), float(value))) for value in (2, 3, 4)]
    inputs = run_one_batch(pool)
    assert inputs[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    for value, future in enumerate([first, *others], start=1):
        assert torch.equal(future.result(timeout=5)[0], torch.full((1, 3), 2.0 * value))


def test_formed_batch_that_lost_tasks_is_refilled_from_the_queue(make_pool):
    pool = make_pool(max_batch_size=4)
    formed = [pool.submit_task(torch.full((1, 3), float(value))) for value in range(4)]
    pool.start()
    assert pool.batch_receiver.poll(5), "the pool should form a batch of the first four tasks"
    waiting = [pool.submit_task(torch.full((1, 3), float(value))) for value in (4, 5, 6)]  # queued behind it
    assert formed[1].cancel() and formed[2].cancel()
    inputs = run_one_batch(pool)
    assert inputs[:, 0].tolist() == [0.0, 3.0, 4.0, 5.0], "the batch shrank instead of taking queued tasks"
    inputs = run_one_batch(pool)
    assert inputs[:, 0].tolist() == [6.0]
    for future in [formed[0], formed[3], *waiting]:
        assert future.result(timeout=5)[0].shape == (1, 3)


def test_refilling_takes_only_tasks_that_fit_the_batch(make_pool):
    pool = make_pool(max_batch_size=4)
    formed = [pool.submit_task(torch.full((2, 3), float(value))) for value in range(2)]
    pool.start()
    assert pool.batch_receiver.poll(5), "the pool should form a batch of both tasks"
    other_shape = pool.submit_task(torch.ones(1, 5))  # cannot join a batch of [*, 3] tensors
    later = pool.submit_task(torch.full((2, 3), 7.0))
    assert formed[0].cancel()
    inputs = run_one_batch(pool)
    assert inputs[:, 0].tolist() == [1.0, 1.0], "queued tasks must join in arrival order, never jump the queue"
    index, (inputs,) = pool.load_batch_to_runtime(timeout=5)
    assert inputs.shape == (1, 5)
    pool.send_outputs_from_runtime(index, doubled(inputs))
    assert torch.equal(run_one_batch(pool), torch.full((2, 3), 7.0))
    assert other_shape.result(timeout=5)[0].shape == (1, 5) and later.result(timeout=5)[0].shape == (2, 3)


def _submit_then_cancel_on_request(pool: TaskPool, connection) -> None:
    future = pool.submit_task(torch.ones(1, 3))
    connection.send("submitted")
    assert connection.recv() == "cancel"
    connection.send(future.cancel())
    connection.recv()  # stay alive (and connected) until the test is done


def wait_until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_task_cancelled_in_a_handler_process_frees_its_place_at_once(make_pool, start_method):
    pool = make_pool(pool_size=1)
    context = mp.get_context(start_method)
    here, there = context.Pipe()
    child = context.Process(target=_submit_then_cancel_on_request, args=(pool, there), daemon=True)
    child.start()
    try:
        assert here.poll(20) and here.recv() == "submitted"
        wait_until(lambda: len(pool._pending) == 1, "the child's task to reach the pool")
        here.send("cancel")
        assert here.poll(10) and here.recv() is True
        wait_until(lambda: len(pool._pending) == 0, "the cancelled task to leave the pool")
        live = pool.submit_task(torch.full((1, 3), 5.0))
        assert not live.done(), f"a live task was refused: {live.exception(0)!r}"
        pool.start()
        run_one_batch(pool)
        assert torch.equal(live.result(timeout=5)[0], torch.full((1, 3), 10.0))
    finally:
        here.send("done")
        child.join(10)
