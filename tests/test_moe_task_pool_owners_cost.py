"""Taking callers' tasks in turn must keep what worked before: a TaskPool subclass written for hivemind 1.1.12, whose
``submit_task(*tensors)`` knows no ``owner``, still serves calls through the server, and forming a batch costs about
its own tasks however many callers wait (not a scan of every caller per batch)."""

import concurrent.futures
import time

import pytest
import torch
from moe_hostile_helpers import HIDDEN, MAX_BATCH, UID, connect_attacker, good_forward, make_backends

from hivemind.dht import DHT
from hivemind.moe.server.server import Server
from hivemind.moe.server.task_pool import TaskPool
from hivemind.moe.server.task_pool_queue import PendingTasks, Task

pytestmark = pytest.mark.usefixtures("frozen_heap")


class CountingPool(TaskPool):
    """A pool subclass as downstream code overrides it: ``submit_task`` takes the tensors only."""

    submitted = 0

    def submit_task(self, *tensors: torch.Tensor):
        self.submitted += 1
        return super().submit_task(*tensors)


@pytest.mark.timeout(60)
async def test_a_pool_whose_submit_task_takes_no_owner_still_serves_calls():
    backends = make_backends([UID])
    backend = backends[UID]
    backend.forward_pool.shutdown()
    backend.forward_pool = CountingPool(backend.forward, max_batch_size=MAX_BATCH, name=f"{UID}_forward")
    server = Server(DHT(start=True), backends, update_period=30, start=True)
    client, stub = await connect_attacker(server)
    try:
        await good_forward(stub, batch=2)  # before: TypeError (unexpected keyword argument 'owner') for every call
        assert backend.forward_pool.submitted == 1
    finally:
        await client.shutdown()
        server.shutdown()


@pytest.mark.timeout(60)
def test_forming_batches_among_many_callers_costs_about_their_own_tasks():
    pending, signature = PendingTasks(), ((torch.float32, (HIDDEN,), torch.device("cpu")),)
    callers, size = 3000, 600  # one task each, none fits beside another in a batch of 1024
    for owner in range(callers):
        pending.append(Task(concurrent.futures.Future(), (), size, signature, 0.0, owner=owner))
    started, batches = time.process_time(), 0
    while pending:
        assert len(pending.take(1024)) == 1
        batches += 1
    spent = time.process_time() - started
    assert batches == callers
    assert spent < 0.5, f"{spent:.2f} s of CPU for {batches} batches"  # before: 3.7-6 s (a scan of every caller)
