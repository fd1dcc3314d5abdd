"""Hedged state downloads: donors of the highest priority that never start sending cannot hold a newcomer for long,
while honest donors that queue it, and hostile ones that start and then stall, are handled as before."""

import asyncio
import logging
import time

import pytest
from async_wait import wait_until
from test_averaging_state_sharing import (
    assert_state_equal,
    declare,
    dht,
    honest_donor,
    load,
    make_state,
    messages_of,
    one_slot_donor_held_until_released,
    prefix,
    serve,
    start_peers,
)

from hivemind.averaging.state_sharing import StateSharing

__all__ = ["dht", "prefix"]  # the fixtures, used by the tests below


class SilentDonor:
    """A handler that accepts a download and never sends anything; counts the streams it was asked and closed."""

    def __init__(self):
        self.asked, self.closed = 0, 0
        self.was_asked = asyncio.Event()
        self.all_closed = asyncio.Event()

    async def __call__(self, _request, _context):
        self.asked += 1
        self.was_asked.set()
        self.all_closed.clear()
        try:
            await asyncio.Event().wait()
        finally:
            self.closed += 1
            if self.closed == self.asked:
                self.all_closed.set()
        yield  # (an async generator that never gets here)


async def silent_donors(dht, prefix, peers, priority):
    donors = []
    for peer in peers:
        donors.append(SilentDonor())
        await serve(peer, prefix, donors[-1])
        await declare(dht, prefix, peer, priority)
    return donors


@pytest.mark.timeout(60)
async def test_silent_top_priority_donors_cost_a_newcomer_one_wait_in_all(dht, p2p_factory, prefix):
    """Before hedging, each silent identity cost 25 s (DONOR_PREPARATION_TIMEOUT): the 10 s given ran out on the
    first one and nothing was loaded. Now they are asked 0.5 s apart, and the honest donor of lower priority, which
    starts at once, is held for them for at most half the time left (about 4 s here)."""
    (*hostile, good), client = await start_peers(p2p_factory, 4)
    silent = await silent_donors(dht, prefix, hostile, priority=10.0)
    _, good_state = await honest_donor(dht, good, prefix, seed=2, priority=1.0)

    started = time.monotonic()
    result = await load(client, dht, prefix, expected=good_state[1], timeout=10, request_timeout=0.5)
    elapsed = time.monotonic() - started
    assert_state_equal(result, good_state)
    assert elapsed < 8.0, f"took {elapsed:.1f} s"
    assert all(donor.asked == 1 for donor in silent)  # each was asked once, in turn, and waited on meanwhile
    for donor in silent:  # and every stream to them is closed, so their handlers end
        await asyncio.wait_for(donor.all_closed.wait(), timeout=5)


@pytest.mark.timeout(60)
async def test_donor_that_starts_then_stalls_is_abandoned_for_the_next_as_before(dht, p2p_factory, prefix, caplog):
    (staller, good), client = await start_peers(p2p_factory, 2)
    _, good_state = await honest_donor(dht, good, prefix, seed=2, priority=1.0)
    messages = messages_of(make_state(seed=1))

    async def serve_then_stall(_request, _context):
        yield messages[0]
        await asyncio.Event().wait()

    await serve(staller, prefix, serve_then_stall)
    await declare(dht, prefix, staller, 100.0)
    with caplog.at_level(logging.WARNING, logger="hivemind.averaging.state_download"):
        result = await load(
            client, dht, prefix, expected=good_state[1], timeout=10, request_timeout=0.5, next_chunk_timeout=0.5
        )
    assert_state_equal(result, good_state)
    failed = [record.getMessage() for record in caplog.records if "failed, trying the next donor" in record.message]
    assert len(failed) == 1 and str(staller.peer_id) in failed[0] and "no message from the donor" in failed[0], failed


@pytest.mark.timeout(60)
async def test_donor_that_queues_the_newcomer_and_then_serves_still_wins_over_silent_ones(dht, p2p_factory, prefix):
    (donor, hostile), client = await start_peers(p2p_factory, 2)
    sharing, state, asked, release, other_client = await one_slot_donor_held_until_released(
        dht, p2p_factory, donor, prefix, state_sharing_priority=10.0
    )
    (silent,) = await silent_donors(dht, prefix, [hostile], priority=1.0)

    first = asyncio.create_task(load(other_client, dht, prefix))
    await asked.wait()  # the first download holds the donor's only slot
    newcomer = asyncio.create_task(load(client, dht, prefix, timeout=20, request_timeout=0.3))
    while sharing.slots.waiting == 0:  # the donor queued it
        await asyncio.sleep(0.01)
    await asyncio.wait_for(silent.was_asked.wait(), timeout=10)  # so the next one is asked too
    assert sharing.slots.waiting == 1  # while the queued download goes on
    release.set()
    assert_state_equal(await first, state)
    assert_state_equal(await newcomer, state)  # the queued donor still served it
    await asyncio.wait_for(silent.all_closed.wait(), timeout=5)  # and the silent one was let go
    assert sharing.slots.active == 0 and sharing.slots.waiting == 0


@pytest.mark.timeout(60)
async def test_donor_of_higher_priority_that_is_slow_to_start_beats_an_older_state_that_starts_at_once(
    dht, p2p_factory, prefix
):
    """An idle peer with an old state (lower priority) answers at once; the up-to-date donor needs 2 s, longer than
    request_timeout. Before, the first to start won and the newcomer loaded the old state."""
    (slow, idle), client = await start_peers(p2p_factory, 2)
    state, slow_asked = make_state(seed=3), []

    async def slow_state():  # longer than request_timeout, but within the wait for a first message
        await asyncio.sleep(2.0)
        return state[0], state[1], None

    sharing = StateSharing(
        dht=dht, peer_id=slow.peer_id, prefix=prefix, get_current_state=slow_state, state_sharing_priority=10.0
    )

    async def serve_slowly(request, context):
        slow_asked.append(time.monotonic())
        async for message in sharing.rpc_download_state(request, context):
            yield message

    await serve(slow, prefix, serve_slowly)
    assert await sharing.declare()
    idle_sharing, _ = await honest_donor(dht, idle, prefix, seed=1, priority=1.0)

    result = await load(client, dht, prefix, timeout=20, request_timeout=0.3)
    assert_state_equal(result, state)  # the better donor's state, not the one that started first
    assert len(slow_asked) == 1
    assert sharing.slots.active == 0 and sharing.slots.waiting == 0
    await wait_until(lambda: idle_sharing.slots.active == 0)  # the older state's stream was closed
