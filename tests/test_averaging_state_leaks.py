"""A donor frees what a download held however the download ends: closed midway by the newcomer, dropped for
stalling, or cut by the donor's shutdown (its slot, its share of the snapshot, and no snapshot left behind)."""

import asyncio
import uuid

import pytest
import torch
from async_wait import wait_until
from test_averaging_state_sharing import DecentralizedAverager, dht, serve

from hivemind.averaging.state_sharing import StateSharing
from hivemind.proto import averaging_pb2

__all__ = ["dht"]  # the fixture, used by the tests below


async def donor_and_clients(dht, p2p_factory, count: int, state, **kwargs):
    donor = await p2p_factory()
    clients = [await p2p_factory(initial_peers=await donor.get_visible_maddrs()) for _ in range(count)]
    for client in clients:
        await client.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    calls = []

    async def get_current_state():
        calls.append(1)
        return {"calls": len(calls)}, state, None

    prefix = f"leaks_{uuid.uuid4().hex[:8]}"
    sharing = StateSharing(
        dht=dht, peer_id=donor.peer_id, prefix=prefix, get_current_state=get_current_state, **kwargs
    )
    await serve(donor, prefix, sharing.rpc_download_state)
    stubs = [DecentralizedAverager.get_stub(client, donor.peer_id, namespace=prefix) for client in clients]
    return sharing, stubs, calls


BIG_STATE = [torch.zeros(16 * 2**20, dtype=torch.uint8) for _ in range(4)]  # 64 MiB: more than the buffers hold


@pytest.mark.timeout(60)
async def test_downloads_closed_midway_release_their_slots_and_snapshot(dht, p2p_factory):
    sharing, stubs, calls = await donor_and_clients(dht, p2p_factory, 3, BIG_STATE)
    for _ in range(2):
        streams = [await stub.rpc_download_state(averaging_pb2.DownloadRequest()) for stub in stubs]
        for stream in streams:
            await stream.__anext__()  # the download runs: it holds a slot and the snapshot
        assert sharing.slots.active == 3 and len(sharing.snapshots.in_use) == 1
        for stream in streams:
            await stream.aclose()  # the newcomer gives up midway
        await wait_until(lambda: sharing.slots.active == 0 and not sharing.snapshots.in_use)
    assert len(calls) == 2  # one snapshot per wave of downloads, none left over


@pytest.mark.timeout(60)
async def test_queued_downloads_whose_newcomers_leave_free_their_queue_places(dht, p2p_factory):
    sharing, stubs, calls = await donor_and_clients(
        dht, p2p_factory, 4, BIG_STATE, max_concurrent_downloads=1, max_queue_wait=30
    )
    first = await stubs[0].rpc_download_state(averaging_pb2.DownloadRequest())
    await first.__anext__()  # holds the only slot
    queued = [asyncio.create_task(stub.rpc_download_state(averaging_pb2.DownloadRequest())) for stub in stubs[1:]]
    streams = await asyncio.gather(*queued)
    readers = [asyncio.create_task(stream.__anext__()) for stream in streams]
    await wait_until(lambda: sharing.slots.waiting == 3)
    for reader in readers:
        reader.cancel()  # the newcomers give up while queued: their streams close
    await asyncio.gather(*readers, return_exceptions=True)
    await wait_until(lambda: sharing.slots.waiting == 0, timeout=5)
    await first.aclose()
    await wait_until(lambda: sharing.slots.active == 0 and not sharing.snapshots.in_use)
    assert len(calls) == 1  # nobody who left got a snapshot taken for it
