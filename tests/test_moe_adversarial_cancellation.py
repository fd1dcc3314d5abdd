"""A client that sends requests and cancels most of them, en masse and at random moments (before batching, inside a
formed batch, while it is computed), while other clients are served: their answers are never mixed up or lost, every
task the pool took is resolved, and nothing goes wrong in the Runtime."""

import asyncio
import random
import time

import pytest
import torch
from moe_hostile_helpers import UID, as_stream, connect_attacker, drain, make_request

from hivemind.compression import deserialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 16
LOAD_SECONDS = 3.0


class SlowExpert(torch.nn.Module):
    """A batch takes a few milliseconds, so that tasks queue up and cancellations reach formed batches."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        time.sleep(0.005)
        return torch.tanh(self.linear(x))


async def cancel_en_masse(stub, stop: asyncio.Event) -> None:
    rng = random.Random(0)
    while not stop.is_set():
        calls = []
        for _ in range(30):
            request = make_request(UID, torch.randn(rng.randint(1, 16), HIDDEN))
            if rng.random() < 0.5:
                calls.append(asyncio.create_task(stub.rpc_forward(request, timeout=60)))
            else:
                calls.append(asyncio.create_task(drain_stream(stub, request)))
        await asyncio.sleep(rng.choice([0, 0.002, 0.01, 0.05]))
        for call in calls:
            if rng.random() < 0.9:
                call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


async def drain_stream(stub, request) -> None:
    await drain(await stub.rpc_forward_stream(as_stream([request])))


async def serve_exactly(stub, expert: SlowExpert, seed: int, stop: asyncio.Event) -> int:
    generator, served = torch.Generator().manual_seed(seed), 0
    while not stop.is_set():
        x = torch.randn(1 + seed, HIDDEN, generator=generator)
        with torch.no_grad():
            expected = expert(x)
        response = await stub.rpc_forward(make_request(UID, x), timeout=60)
        output = deserialize_torch_tensor(response.tensors[0])
        assert torch.allclose(output, expected, atol=1e-5), "a client got rows that are not the answer to its request"
        served += 1
    return served


@pytest.mark.timeout(120)
@pytest.mark.parametrize("handler_processes", [False, True], ids=["handler-thread", "handler-processes"])
async def test_mass_cancellation_never_mixes_up_or_loses_answers(handler_processes, hivemind_warnings):
    torch.manual_seed(0)
    expert = SlowExpert()
    backend = ModuleBackend(
        UID,
        expert,
        args_schema=(BatchTensorDescriptor(HIDDEN),),
        outputs_schema=BatchTensorDescriptor(HIDDEN),
        max_batch_size=64,
    )
    pool, taken = backend.forward_pool, []
    enqueue = pool._enqueue

    def recording_enqueue(future, *task):  # every task the pool takes, from this process or a handler's
        taken.append(future)
        return enqueue(future, *task)

    pool._enqueue = recording_enqueue
    server = Server(
        DHT(start=True), {UID: backend}, num_connection_handlers=2 if handler_processes else None, start=True
    )
    (good, good_stub), (attacker, attacker_stub) = await connect_attacker(server), await connect_attacker(server)
    try:
        stop = asyncio.Event()
        load = [asyncio.create_task(serve_exactly(good_stub, expert, seed, stop)) for seed in range(3)]
        load.append(asyncio.create_task(cancel_en_masse(attacker_stub, stop)))
        await asyncio.sleep(LOAD_SECONDS)
        stop.set()
        served = await asyncio.gather(*load)
        assert all(count > 0 for count in served[:3])

        deadline = time.monotonic() + 20
        while not all(future.done() for future in taken):
            assert time.monotonic() < deadline, f"{sum(not f.done() for f in taken)} tasks were never resolved"
            await asyncio.sleep(0.05)
        assert any(future.cancelled() for future in taken), "no cancellation reached the pool"
        assert not pool._pending and not pool._ready and not pool._in_flight
        assert not hivemind_warnings, hivemind_warnings
    finally:
        await attacker.shutdown()
        await good.shutdown()
        server.shutdown()
