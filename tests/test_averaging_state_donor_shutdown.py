"""A donor averager shut down while newcomers download its state ends those downloads cleanly: their tasks are
cancelled and awaited before the averager's event loop closes (no error about their generators at shutdown)."""

import asyncio

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.state_sharing import DEFAULT_MAX_CONCURRENT_DOWNLOADS
from hivemind.proto import averaging_pb2


@pytest.mark.timeout(60)
async def test_donor_shut_down_mid_download_logs_no_error(p2p_factory, capfd):
    state = [torch.zeros(16 * 2**20)]  # 64 MiB: more than the stream's buffers hold
    with dht_swarm(1) as dhts, averagers_on(dhts, [state], start_method="spawn") as (donor,):
        newcomers = []
        for _ in range(DEFAULT_MAX_CONCURRENT_DOWNLOADS + 1):
            newcomers.append(await p2p_factory(initial_peers=dhts[0].get_visible_maddrs()))
        for newcomer in newcomers:
            await newcomer.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
        stubs = [DecentralizedAverager.get_stub(peer, dhts[0].peer_id, namespace=donor.prefix) for peer in newcomers]
        streams = [await stub.rpc_download_state(averaging_pb2.DownloadRequest()) for stub in stubs]
        for stream in streams[:-1]:
            await stream.__anext__()  # these downloads run and then stall (their newcomers stop reading)
        queued = asyncio.create_task(streams[-1].__anext__())  # this one waits for a free slot inside the donor
        await asyncio.sleep(0.5)  # (nothing to await on this side: the donor queues it at once)
        await asyncio.get_running_loop().run_in_executor(None, donor.shutdown)
        assert donor.exitcode == 0
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
    errors = [line for line in capfd.readouterr().err.splitlines() if "ERROR" in line or "already running" in line]
    assert not errors, "\n".join(errors)
