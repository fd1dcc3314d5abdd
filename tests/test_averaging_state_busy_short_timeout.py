"""A newcomer with a ``timeout`` whose best donor stays busy asks the donors far below it, which it defers for a while
(BUSY_PREFER_WINDOW) hoping the busy one frees, with at least half the timeout left, so one that takes a few seconds
to prepare its state still delivers it. Before, they were asked only once no busy pause fitted before the timeout
(with 14 s: after 10 s or later), too late for such a donor: None, where its state used to be taken at once."""

import asyncio
import time

import pytest
from test_averaging_state_busy_donor import _one_slot_donor
from test_averaging_state_sharing import (
    assert_state_equal,
    honest_donor,
    load,
    make_state,
    prefix,
    serve,
    start_peers,
)

import hivemind
from hivemind.averaging.state_sharing import StateSharing

__all__ = ["prefix"]  # the fixture, used below


@pytest.fixture(scope="module")
def dht():
    with hivemind.DHT(start=True) as instance:
        yield instance


@pytest.mark.timeout(60)
async def test_a_donor_deferred_for_a_busy_one_is_asked_with_time_left_to_send(dht, p2p_factory, prefix):
    (best, slow), client = await start_peers(p2p_factory, 2)
    other_client = await p2p_factory(initial_peers=await best.get_visible_maddrs())
    await other_client.wait_for_at_least_n_peers(2, attempts=100, delay=0.05)
    _, _, asked, release = await _one_slot_donor(dht, best, prefix, max_queued_downloads=0, state_sharing_priority=5.0)
    slow_state = make_state(seed=11)

    async def prepared_in_5_seconds():  # (e.g. a large state copied before it is sent)
        await asyncio.sleep(5.0)
        return slow_state[0], slow_state[1], None

    sharing = StateSharing(
        dht=dht, peer_id=slow.peer_id, prefix=prefix, get_current_state=prepared_in_5_seconds,
        state_sharing_priority=0.0,
    )  # fmt: skip
    await serve(slow, prefix, sharing.rpc_download_state)
    assert await sharing.declare()
    first = asyncio.create_task(load(client, dht, prefix))
    try:
        await asked.wait()  # the first download holds the best donor's only slot until the end of the test
        started = time.monotonic()
        assert_state_equal(await load(other_client, dht, prefix, timeout=14.0), slow_state)
        assert time.monotonic() - started < 14.0
    finally:
        release.set()
        await first


@pytest.mark.timeout(60)
async def test_a_deferred_donor_is_asked_when_the_window_ends_while_an_equal_one_is_slow_to_start(
    dht, p2p_factory, prefix
):
    # the best donor is busy, a donor of the same priority accepts but does not start sending (its state is not ready,
    # or it is hostile): the deferred one is asked when the window ends, not only once that download failed (here at
    # the timeout: None)
    (best, stalled, older), client = await start_peers(p2p_factory, 3)
    other_client = await p2p_factory(initial_peers=await best.get_visible_maddrs())
    await other_client.wait_for_at_least_n_peers(3, attempts=100, delay=0.05)
    _, _, asked, release = await _one_slot_donor(dht, best, prefix, max_queued_downloads=0, state_sharing_priority=5.0)
    never_ready = asyncio.Event()

    async def not_ready():
        await never_ready.wait()

    sharing = StateSharing(
        dht=dht, peer_id=stalled.peer_id, prefix=prefix, get_current_state=not_ready, state_sharing_priority=5.0
    )
    await serve(stalled, prefix, sharing.rpc_download_state)
    assert await sharing.declare()
    _, older_state = await honest_donor(dht, older, prefix, seed=7, priority=0.0)
    first = asyncio.create_task(load(client, dht, prefix, timeout=40.0))
    try:
        await asked.wait()  # the first download holds the best donor's only slot until the end of the test
        assert_state_equal(await load(other_client, dht, prefix, timeout=14.0), older_state)
    finally:
        release.set()
        never_ready.set()
        await first
