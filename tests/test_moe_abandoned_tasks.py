"""Tasks whose callers went away are not computed, even when they already joined a formed batch."""

import asyncio
import threading
from typing import List

import pytest
import torch

from hivemind.compression import deserialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.moe.server.task_pool import AbandonedBatchError, TaskPool
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from moe_hostile_helpers import connect_attacker, make_request  # isort: skip

HIDDEN = 64


def doubled(*inputs):
    return tuple(tensor * 2 for tensor in inputs)


@pytest.fixture
def pool():
    pool = TaskPool(doubled, max_batch_size=64, name="abandoned_pool")
    yield pool
    pool.shutdown()


def wait_until_formed(pool: TaskPool) -> None:
    pool.start()
    assert pool.batch_receiver.poll(10), "the pool should form a batch"


def test_batch_whose_callers_all_left_is_not_handed_to_the_runtime(pool):
    futures = [pool.submit_task(torch.ones(2, 3)) for _ in range(3)]
    wait_until_formed(pool)  # all three tasks are in the batch now
    assert all(future.cancel() for future in futures)
    with pytest.raises(AbandonedBatchError, match="went away"):
        pool.load_batch_to_runtime(timeout=5)
    later = pool.submit_task(torch.full((1, 3), 5.0))  # the pool goes on serving
    index, (inputs,) = pool.load_batch_to_runtime(timeout=5)
    pool.send_outputs_from_runtime(index, doubled(inputs))
    assert torch.equal(later.result(timeout=5)[0], torch.full((1, 3), 10.0))


def test_cancelled_task_of_a_formed_batch_is_left_out_of_it(pool):
    futures = [pool.submit_task(torch.full((size, 3), float(size))) for size in (1, 2, 3)]
    wait_until_formed(pool)
    assert futures[1].cancel()
    index, (inputs,) = pool.load_batch_to_runtime(timeout=5)
    assert inputs.tolist() == [[1.0] * 3] + [[3.0] * 3] * 3  # the rows of the first and the last task only
    pool.send_outputs_from_runtime(index, doubled(inputs))
    assert torch.equal(futures[0].result(timeout=5)[0], torch.full((1, 3), 2.0))
    assert torch.equal(futures[2].result(timeout=5)[0], torch.full((3, 3), 6.0))
    assert futures[1].cancelled()


def test_task_taken_by_the_runtime_can_no_longer_be_cancelled(pool):
    future = pool.submit_task(torch.ones(1, 3))
    wait_until_formed(pool)
    index, (inputs,) = pool.load_batch_to_runtime(timeout=5)
    assert future.running() and not future.cancel()
    pool.send_outputs_from_runtime(index, doubled(inputs))
    assert torch.equal(future.result(timeout=5)[0], torch.full((1, 3), 2.0))


class GatedExpert(torch.nn.Module):
    """Doubles its input; its first call waits for ``gate``. Records the size of every batch it computes."""

    def __init__(self):
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()
        self.batch_sizes: List[int] = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        if len(self.batch_sizes) == 1:
            self.entered.set()
            assert self.gate.wait(30)
        return x * 2


async def wait_for(condition, what: str, timeout: float = 20) -> None:
    """Check ``condition()`` until it holds (state changes here happen in other threads and processes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.mark.timeout(90)
async def test_runtime_does_not_compute_the_requests_of_a_client_that_cancelled_them():
    expert = GatedExpert()
    backend = ModuleBackend(
        "gated.0",
        expert,
        args_schema=(BatchTensorDescriptor(HIDDEN),),
        outputs_schema=BatchTensorDescriptor(HIDDEN),
        max_batch_size=4096,
    )
    pool = backend.forward_pool
    submitted = []
    submit_task = pool.submit_task

    def recording_submit(*tensors, **options):
        submitted.append(submit_task(*tensors, **options))
        return submitted[-1]

    pool.submit_task = recording_submit
    server = Server(DHT(start=True), {"gated.0": backend}, update_period=30, start=True)
    client, stub = await connect_attacker(server)
    try:
        first = asyncio.create_task(stub.rpc_forward(make_request("gated.0", torch.ones(1, HIDDEN)), timeout=60))
        assert await asyncio.get_running_loop().run_in_executor(None, expert.entered.wait, 30)
        # the runtime is busy: a client sends many large requests, which queue up (the first ones form a batch)
        abandoned = [
            asyncio.create_task(stub.rpc_forward(make_request("gated.0", torch.randn(512, HIDDEN)), timeout=60))
            for _ in range(8)
        ]
        await wait_for(lambda: len(submitted) == 9, "the requests to reach the pool")
        await wait_for(lambda: not pool.empty, "the pool to form a batch of them")
        for call in abandoned:
            call.cancel()  # the client gives up on all of them
        await asyncio.gather(*abandoned, return_exceptions=True)
        # (a task that the pool already marked running cannot be cancelled: it is computed anyway)
        arrived = lambda: all(future.cancelled() or future.running() for future in submitted[1:])  # noqa: E731
        await wait_for(arrived, "the cancellations to arrive")

        expert.gate.set()
        (output,) = [deserialize_torch_tensor(tensor) for tensor in (await first).tensors]
        assert torch.equal(output, torch.full((1, HIDDEN), 2.0))
        x = torch.randn(3, HIDDEN)
        response = await stub.rpc_forward(make_request("gated.0", x), timeout=30)
        assert torch.equal(deserialize_torch_tensor(response.tensors[0]), x * 2)
        assert expert.batch_sizes == [1, 3], "the runtime computed requests whose client had gone away"
    finally:
        expert.gate.set()
        await client.shutdown()
        server.shutdown()
