"""A donor averager shut down while newcomers download its state ends those downloads cleanly: their tasks are
cancelled and awaited before the averager's event loop closes (no error about their generators at shutdown), and a
get_current_state() cut short by the shutdown logs no warning (while a user's get_current_state that fails still does).
"""

import asyncio
import logging
import threading

import pytest
import torch
from averager_helpers import FAST, averagers_on, dht_swarm

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


class GatedAverager(DecentralizedAverager):
    """Its get_current_state (in the user's process) waits for ``release``, then runs the default one, or raises
    ``failure`` if set."""

    entered = threading.Event()
    release = threading.Event()
    failure = None

    def get_current_state(self):
        GatedAverager.entered.set()
        assert GatedAverager.release.wait(30)
        if GatedAverager.failure is not None:
            raise GatedAverager.failure
        return super().get_current_state()


async def _start_download(donor, dht, p2p_factory):
    newcomer = await p2p_factory(initial_peers=dht.get_visible_maddrs())
    await newcomer.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    stub = type(donor).get_stub(newcomer, dht.peer_id, namespace=donor.prefix)
    download = stub.rpc_download_state(averaging_pb2.DownloadRequest())
    stream = await download
    return stream, asyncio.create_task(stream.__anext__())


def _state_warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "get_current_state" in r.getMessage()]


@pytest.mark.timeout(60)
async def test_shutdown_during_get_current_state_logs_no_warning(p2p_factory, caplog):
    GatedAverager.entered.clear(), GatedAverager.release.clear()
    GatedAverager.failure = None
    with dht_swarm(1) as dhts:
        donor = GatedAverager([torch.zeros(100)], dhts[0], prefix="gated", start=True, start_method="fork", **FAST)
        try:
            stream, first = await _start_download(donor, dhts[0], p2p_factory)
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, GatedAverager.entered.wait, 30)  # the state is being taken
            await loop.run_in_executor(None, donor.shutdown)
            GatedAverager.release.set()  # the default get_current_state now asks the (gone) averager for group bits
            await loop.run_in_executor(None, donor._state_thread.join, 30)
            assert not donor._state_thread.is_alive()
        finally:
            GatedAverager.release.set()
            donor.shutdown()
        await asyncio.gather(first, return_exceptions=True)
        await stream.aclose()
    assert not _state_warnings(caplog)


@pytest.mark.timeout(60)
async def test_failing_get_current_state_still_logs_a_warning(p2p_factory, caplog):
    GatedAverager.entered.clear(), GatedAverager.release.set()
    GatedAverager.failure = ValueError("the user's state is broken")
    with dht_swarm(1) as dhts:
        donor = GatedAverager([torch.zeros(100)], dhts[0], prefix="gated", start=True, start_method="fork", **FAST)
        try:
            stream, first = await _start_download(donor, dhts[0], p2p_factory)
            with pytest.raises(Exception, match="broken"):
                await first  # refused after the user's process logged the failure
            await stream.aclose()
        finally:
            GatedAverager.failure = None
            donor.shutdown()
    assert [r.levelno for r in _state_warnings(caplog)] == [logging.WARNING]
