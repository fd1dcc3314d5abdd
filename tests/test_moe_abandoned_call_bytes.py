"""MoE fault handling: calls abandoned by their callers give back their request bytes and cancel
their tasks, whichever RPC they used and wherever they were when the caller went away."""

import asyncio

import pytest
import torch
from async_wait import wait_until
from moe_hostile_helpers import HIDDEN, UID, as_stream, chunked, connect_attacker, drain, hostile_server, make_request

from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.expert_requests import ExpertSchema, RequestBytesInFlight
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.tensor_descr import BatchTensorDescriptor

__all__ = ["hostile_server"]


@pytest.fixture
async def caller(hostile_server):
    client, stub = await connect_attacker(hostile_server)
    try:
        yield stub
    finally:
        await client.shutdown()


@pytest.fixture
def stalled_tasks(hostile_server, monkeypatch):
    """The forward pool of UID never answers: every task waits until its caller goes away."""
    futures = []

    def submit(*tensors):
        future = MPFuture()
        futures.append(future)
        return future

    monkeypatch.setattr(hostile_server.module_backends[UID].forward_pool, "submit_task", submit)
    return futures


@pytest.fixture
def budget(hostile_server, monkeypatch) -> RequestBytesInFlight:
    (handler,) = hostile_server.conn_handlers
    budget = RequestBytesInFlight(2**30, 2**30)
    monkeypatch.setattr(handler, "_bytes_in_flight", budget)
    return budget


@pytest.mark.timeout(60)
async def test_unary_call_abandoned_while_its_task_waits_gives_its_bytes_back(caller, stalled_tasks, budget):
    call = asyncio.create_task(caller.rpc_forward(make_request(UID, torch.randn(4, HIDDEN))))
    await wait_until(lambda: stalled_tasks and budget.used > 0, "the task to be submitted")
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    await wait_until(lambda: stalled_tasks[0].cancelled(), "the abandoned task to be cancelled")
    await wait_until(lambda: budget.used == 0 and not budget.used_by_peer, "the call's bytes to be given back")


@pytest.mark.timeout(60)
async def test_stream_abandoned_while_its_task_waits_gives_its_bytes_back(caller, stalled_tasks, budget):
    call = asyncio.create_task(drain(await caller.rpc_forward_stream(as_stream(chunked(torch.randn(64, HIDDEN))))))
    await wait_until(lambda: stalled_tasks and budget.used > 0, "the task to be submitted")
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    await wait_until(lambda: stalled_tasks[0].cancelled(), "the abandoned task to be cancelled")
    await wait_until(lambda: budget.used == 0 and not budget.used_by_peer, "the call's bytes to be given back")


def test_one_trainer_step_at_the_cli_defaults_is_not_refused_by_the_per_caller_limit():
    """hivemind-server's default max_batch_size (16384), 16 ffn experts of hid 1024, one trainer with 16384 tokens
    and k_best=4: its backward calls every expert at once with 4096 rows (inputs and output gradients), 512 MiB in
    all. A per-caller limit below that refuses half of them, and the mixture then masks (and penalizes) honest
    experts at every step."""
    hidden, experts, tokens, k_best, max_batch_size = 1024, 16, 16384, 4, 16384
    handler = ConnectionHandler.__new__(ConnectionHandler)
    handler._bytes_in_flight = None
    descriptor = BatchTensorDescriptor.from_tensor(torch.zeros(1, hidden))  # as Server.create describes ffn
    handler._schemas = {
        f"ffn.{index}": ExpertSchema(f"ffn.{index}", (descriptor,), (descriptor,), max_batch_size)
        for index in range(experts)
    }
    held = handler._hold(None, "backward")
    rows = tokens * k_best // experts
    for _ in range(experts):
        held.add(2 * rows * hidden * 4 + 3 * 256)  # one backward request: inputs and output gradients, float32
    held.__exit__(None, None, None)
    budget = handler._bytes_in_flight
    assert budget.used == 0 and budget.per_peer <= budget.total // 2, "one caller alone must not fill the total"
