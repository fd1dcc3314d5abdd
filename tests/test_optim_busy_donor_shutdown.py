"""A peer of hivemind.Optimizer whose only donor always answers busy waits for it until load_state_timeout (donors
busy serving other newcomers are asked again), and shutdown() from another thread ends that wait at once."""

import asyncio
import threading
import time
from typing import AsyncIterator

import pytest
import torch
from optim_swarm_helpers import make_optimizer

from hivemind.averaging.state_sharing import all_averagers_key
from hivemind.averaging.state_snapshot import DONOR_BUSY_HINT, DonorBusyError
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

RUN_ID = "busy_donor_shutdown"


class TrainingStateAverager(ServicerBase):
    """A donor (named as the optimizer's state averager, whose handler a newcomer calls) that is always busy."""

    def __init__(self):
        self.asked = 0

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        self.asked += 1
        raise DonorBusyError(f"always busy: {DONOR_BUSY_HINT}")
        yield  # (an async generator)


@pytest.mark.timeout(90)
def test_shutdown_ends_the_wait_for_a_donor_that_is_always_busy():
    dht = DHT(start=True)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    donor, p2p, newcomer_dht, newcomer = TrainingStateAverager(), None, None, None
    try:

        async def start_donor() -> P2P:
            instance = await P2P.create(initial_peers=dht.get_visible_maddrs())
            await donor.add_p2p_handlers(instance, namespace=f"{RUN_ID}_state_averager")
            return instance

        p2p = asyncio.run_coroutine_threadsafe(start_donor(), loop).result(30)
        key = all_averagers_key(f"{RUN_ID}_state_averager")
        assert dht.store(key, 1e9, get_dht_time() + 120, subkey=p2p.peer_id.to_bytes())
        newcomer_dht = DHT(initial_peers=dht.get_visible_maddrs(), start=True)
        newcomer = make_optimizer(newcomer_dht, torch.nn.Linear(2, 1), RUN_ID, load_state_timeout=60.0)
        outcome = {}

        def download():
            try:
                outcome["result"] = newcomer.load_state_from_peers()
            except Exception as e:
                outcome["result"] = e
            outcome["ended"] = time.monotonic()

        thread = threading.Thread(target=download)
        thread.start()
        deadline = time.monotonic() + 30
        while donor.asked < 3:  # refused as busy, and asked again
            assert time.monotonic() < deadline and thread.is_alive(), (donor.asked, outcome)
            time.sleep(0.05)
        shutdown_at = time.monotonic()
        newcomer.shutdown()
        assert time.monotonic() - shutdown_at < 10.0
        thread.join(30)
        assert not thread.is_alive() and outcome["ended"] - shutdown_at < 10.0, outcome
        assert isinstance(outcome["result"], RuntimeError), outcome  # says that the averager was shut down
    finally:
        if newcomer is not None:
            newcomer.shutdown()
        if newcomer_dht is not None:
            newcomer_dht.shutdown()
        if p2p is not None:
            asyncio.run_coroutine_threadsafe(p2p.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
        dht.shutdown()
