"""The rate floor of state downloads: a peer that moves the state too slowly is dropped, a slow but steady one is not.

A reader (or donor) that moves one chunk just before every per-chunk timeout would otherwise hold the other end for
hours; on the donor's side it holds one of its few download slots, so that a handful of them lock every newcomer out.
"""

import asyncio
import logging
from typing import AsyncIterator, List

import pytest
import torch
from test_averaging_state_sharing import (
    DecentralizedAverager,
    assert_state_equal,
    declare,
    dht,
    load,
    prefix,
    serve,
    start_peers,
)

from hivemind.averaging.state_download import StateAssembler, decode_chunks
from hivemind.averaging.state_rate import RateFloor
from hivemind.averaging.state_sharing import StateSharing
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming

__all__ = ["dht", "prefix"]  # the fixtures, used by the tests below

MiB = 2**20
CHUNK = 2**16


def big_state():
    """40 MiB: more than the buffers between two daemons on this machine hold (about 24 MiB), so that a reader's pace
    reaches the donor."""
    return {"big": True}, [torch.arange(40 * MiB // 4, dtype=torch.int32)]


def paced_sharing(dht, p2p, prefix, state, min_send_rate: float, **kwargs) -> StateSharing:
    async def get_current_state():
        return state[0], state[1], None

    return StateSharing(
        dht=dht,
        peer_id=p2p.peer_id,
        prefix=prefix,
        get_current_state=get_current_state,
        send_stall_timeout=5.0,  # longer than any pause of the readers below: only the rate floor can drop them
        min_send_rate=min_send_rate,
        send_rate_grace=0.5,
        **kwargs,
    )


async def read_paced(stream, messages_per_pause: int, pause: float) -> List[averaging_pb2.DownloadData]:
    received = []
    async for message in stream:
        received.append(message)
        if len(received) % messages_per_pause == 0:
            await asyncio.sleep(pause)
    return received


# ------------------------------------------------------------------ the rule itself (no I/O)


def test_steady_rate_at_the_floor_never_trips():
    floor, now = RateFloor(min_rate=1000, grace=1), 0.0
    for _ in range(10_000):  # 1000 s, always waiting, at the floor exactly
        floor.wait_started(now)
        now += 0.1
        floor.wait_ended(now, 100)
        assert floor.check(now) is None


def test_trickle_trips_once_the_grace_and_what_it_moved_are_used_up():
    floor, now = RateFloor(min_rate=1000, grace=10), 0.0
    floor.wait_ended(now, 5000)  # 5000 bytes into the buffers at no wait: 5 s of credit
    while floor.check(now) is None:
        floor.wait_started(now)
        now += 1.0
        floor.wait_ended(now, 500)  # then half the floor
    assert now == 31.0  # the first t with t > 10 + (5000 + 500 * t) / 1000


def test_a_wait_in_progress_counts_and_own_work_does_not():
    floor = RateFloor(min_rate=1000, grace=10)
    assert floor.check(1000.0) is None  # 1000 s of our own work: we never waited on the other end
    floor.wait_started(1000.0)
    assert floor.check(1010.0) is None
    reason = floor.check(1010.5)  # one wait that has not ended yet
    assert reason is not None and "0 bytes in 10.5 s of waiting" in reason


def test_no_floor_never_trips_and_bad_limits_are_refused():
    floor = RateFloor(min_rate=None, grace=1)
    floor.wait_started(0.0)
    assert floor.check(1000.0) is None
    for kwargs in (dict(min_rate=0, grace=1), dict(min_rate=1, grace=-1)):
        with pytest.raises(ValueError):
            RateFloor(**kwargs)


# ------------------------------------------------------------------ the donor drops slow readers


@pytest.mark.timeout(60)
async def test_reader_below_the_floor_is_dropped_and_the_queued_newcomer_is_served(dht, p2p_factory, prefix, caplog):
    (donor,), newcomer = await start_peers(p2p_factory, 1)
    slow = await p2p_factory(initial_peers=await donor.get_visible_maddrs())
    await slow.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    state = big_state()
    # the reader below gets about 24 MiB of buffered messages at once: 3 s of credit at 8 MiB/s
    sharing = paced_sharing(dht, donor, prefix, state, 8 * MiB, max_concurrent_downloads=1, max_queue_wait=30)
    await serve(donor, prefix, sharing.rpc_download_state)
    await declare(dht, prefix, donor, 1.0)

    stream = await DecentralizedAverager.get_stub(slow, donor.peer_id, namespace=prefix).rpc_download_state(
        averaging_pb2.DownloadRequest()
    )
    slow_reader = asyncio.create_task(read_paced(stream, messages_per_pause=1, pause=0.1))  # 640 KiB/s, steadily
    while sharing.slots.active == 0:
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="hivemind.averaging.state_sharing"):
        # without the floor the slow reader would hold the only slot for about a minute
        assert_state_equal(await load(newcomer, dht, prefix, timeout=20), state)
    assert not slow_reader.done()  # it still reads what the buffers hold, and then the error that ends the stream
    slow_reader.cancel()
    await asyncio.gather(slow_reader, return_exceptions=True)
    await stream.aclose()
    dropped = [record.getMessage() for record in caplog.records if "Dropped the state download" in record.message]
    assert len(dropped) == 1 and str(slow.peer_id) in dropped[0] and "reads too slowly" in dropped[0]


@pytest.mark.timeout(60)
async def test_throttled_but_steady_reader_gets_the_whole_state(dht, p2p_factory, prefix, caplog):
    (donor,), reader = await start_peers(p2p_factory, 1)
    state = big_state()
    sharing = paced_sharing(dht, donor, prefix, state, 4 * MiB)
    await serve(donor, prefix, sharing.rpc_download_state)
    stream = await DecentralizedAverager.get_stub(reader, donor.peer_id, namespace=prefix).rpc_download_state(
        averaging_pb2.DownloadRequest()
    )
    with caplog.at_level(logging.WARNING, logger="hivemind.averaging.state_sharing"):
        messages = await read_paced(stream, messages_per_pause=16, pause=0.125)  # 1 MiB per 1/8 s: 8 MiB/s at most
    assembler = StateAssembler(state[1])
    chunks = [finished for finished in map(assembler.add, messages) if finished is not None]
    chunks.append(assembler.finish())
    assert_state_equal((assembler.metadata, [decode_chunks(parts) for parts in chunks]), state)
    assert not [record for record in caplog.records if "Dropped the state download" in record.message]


# ------------------------------------------------------------------ the newcomer abandons slow donors


async def trickle(_request, _context) -> AsyncIterator[averaging_pb2.DownloadData]:
    """A valid 40 MiB state, one 64 KiB chunk per 0.1 s (about a minute), never slow enough for a chunk timeout."""
    metadata, tensors = big_state()
    for index, chunk in enumerate(split_for_streaming(serialize_torch_tensor(tensors[0]), CHUNK)):
        if index == 0:
            yield averaging_pb2.DownloadData(metadata=MSGPackSerializer.dumps(metadata), tensor_part=chunk)
        else:
            await asyncio.sleep(0.1)
            yield averaging_pb2.DownloadData(tensor_part=chunk)


@pytest.mark.timeout(60)
async def test_donor_below_the_floor_is_abandoned_for_the_next(dht, p2p_factory, prefix, caplog):
    (trickler, honest), newcomer = await start_peers(p2p_factory, 2)
    await serve(trickler, prefix, trickle)
    await declare(dht, prefix, trickler, 10.0)
    sharing = paced_sharing(dht, honest, prefix, big_state(), 2 * MiB)
    await serve(honest, prefix, sharing.rpc_download_state)
    await declare(dht, prefix, honest, 1.0)
    with caplog.at_level(logging.WARNING, logger="hivemind.averaging.state_download"):
        # no overall timeout: only the floor ends the trickle before its minute is over
        loaded = await asyncio.wait_for(
            load(newcomer, dht, prefix, next_chunk_timeout=5.0, min_rate=2 * MiB, rate_grace=1.0), timeout=20
        )
    assert_state_equal(loaded, big_state())
    failed = [record.getMessage() for record in caplog.records if "failed, trying the next donor" in record.message]
    assert len(failed) == 1 and str(trickler.peer_id) in failed[0] and "sends too slowly" in failed[0]
