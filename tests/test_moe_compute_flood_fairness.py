"""One caller flooding an expert with many concurrent full batches must not make another caller wait for the whole
flood, whether it calls the same expert (the pool forms batches taking the callers' tasks in turn) or another expert
of the server (the Runtime lets busy pools take turns): an honest call waits about one or two batches.

The expert sleeps in proportion to its batch (it stands for compute without competing for the CPU with the rest of
the test), and the honest latency is compared with the flood's own latency, measured in the same window: both grow
alike on a loaded machine. Before the fix an honest call waited for every flood task queued before it (its latency
was about the flood's, ratio ~1); now it is a few batches (ratio under 0.1 on 2 cores).
"""

import asyncio
import statistics
import time

import pytest
import torch
from moe_hostile_helpers import HIDDEN, connect_attacker, good_forward, make_request

from hivemind.dht import DHT
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

UID, OTHER_UID = "slow.0", "slow.1"
MAX_BATCH = 64
SECONDS_PER_ROW = 0.0003  # a full batch "computes" for ~19 ms
FLOOD_CALLS = 48  # concurrent full-batch calls the flooding peer keeps in flight
HONEST_CALLS = 8


class SlowExpert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, inputs):
        time.sleep(SECONDS_PER_ROW * len(inputs))
        return self.linear(inputs)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("honest_uid", [UID, OTHER_UID], ids=["same-expert", "other-expert"])
async def test_an_honest_caller_does_not_wait_for_another_callers_flood(honest_uid):
    backends = {
        uid: ModuleBackend(
            uid,
            SlowExpert(),
            args_schema=(BatchTensorDescriptor(HIDDEN),),
            outputs_schema=BatchTensorDescriptor(HIDDEN),
            max_batch_size=MAX_BATCH,
        )
        for uid in (UID, OTHER_UID)
    }
    server = Server(DHT(start=True), backends, update_period=30, start=True)
    flooder, flood_stub = await connect_attacker(server)
    honest, honest_stub = await connect_attacker(server)
    stop, answered = asyncio.Event(), [asyncio.Event() for _ in range(FLOOD_CALLS)]
    flood_latencies = []
    window = [float("inf")]  # flood calls that start after this time are measured

    async def flood(index: int):
        while not stop.is_set():
            started = time.monotonic()
            await flood_stub.rpc_forward(make_request(UID, torch.randn(MAX_BATCH, HIDDEN)), timeout=60)
            if started >= window[0]:
                flood_latencies.append(time.monotonic() - started)
            answered[index].set()

    flooding = [asyncio.create_task(flood(index)) for index in range(FLOOD_CALLS)]
    try:
        for event in answered:  # every flood call went through the queue once: the pool is full of them
            await event.wait()
        window[0] = time.monotonic()
        honest_latencies = []
        for _ in range(HONEST_CALLS):
            started = time.monotonic()
            await good_forward(honest_stub, uid=honest_uid, batch=1)
            honest_latencies.append(time.monotonic() - started)
        while len(flood_latencies) < FLOOD_CALLS:  # flood calls made entirely while the honest caller was calling
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*flooding)
        flood_median = statistics.median(flood_latencies)
        honest_median, honest_max = statistics.median(honest_latencies), max(honest_latencies)
        print(f"flood calls {flood_median:.3f} s (median), honest {honest_median:.3f} s (median) {honest_max:.3f} s")
        assert honest_median < flood_median / 4, (honest_latencies, flood_median)
        assert honest_max < flood_median / 2, (honest_latencies, flood_median)
    finally:
        stop.set()
        for task in flooding:
            task.cancel()
        await asyncio.gather(*flooding, return_exceptions=True)
        await flooder.shutdown()
        await honest.shutdown()
        server.shutdown()
