"""Every task a pool took is resolved, even when the Runtime cannot move its batch to the device (on a GPU server, a
CUDA out-of-memory error while a large batch is copied): its callers must get an error, not wait forever."""

import pytest
import torch

from hivemind.moe.server.task_pool import TaskPool

UNUSABLE_DEVICE = torch.device("cuda", 999)  # no machine has it: moving a tensor there always raises


def doubled(x):
    return x * 2


@pytest.fixture
def pool():
    pool = TaskPool(doubled, max_batch_size=64, name="device_pool")
    yield pool
    pool.shutdown()


def test_tasks_of_a_batch_that_cannot_reach_the_device_are_failed(pool):
    future = pool.submit_task(torch.ones(2, 3))
    pool.start()
    assert pool.batch_receiver.poll(10), "the pool should form a batch"
    with pytest.raises((RuntimeError, AssertionError)):  # torch without CUDA, or no such GPU
        pool.load_batch_to_runtime(timeout=5, device=UNUSABLE_DEVICE)
    assert future.exception(timeout=2) is not None  # (TimeoutError while nobody resolves the task)
    assert not pool._in_flight
