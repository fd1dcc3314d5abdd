"""A newcomer whose best donor answers busy waits for it (asking it again after short pauses, for up to
BUSY_PREFER_WINDOW) before it takes the state of a donor whose priority is far lower (for an optimizer: a peer more
than an epoch behind, e.g. another newcomer that has not begun its own download). Before, it took that older state
at once: a newcomer of hivemind.Optimizer then stayed behind and downloaded again at its next step."""

import asyncio
import time

import pytest
from test_averaging_state_busy_donor import _one_slot_donor
from test_averaging_state_sharing import assert_state_equal, honest_donor, load, prefix, start_peers

import hivemind
from hivemind.averaging import state_download

__all__ = ["prefix"]  # the fixture, used below


@pytest.fixture(scope="module")
def dht():
    with hivemind.DHT(start=True) as instance:
        yield instance


async def _busy_best_donor_and_an_older_one(dht, p2p_factory, prefix, older_priority):
    """A donor of priority 5 whose only slot holds a first newcomer's download until released, a donor of
    ``older_priority``, and a second newcomer; returns (second newcomer, best's state, older's state, release)."""
    (best, older), client = await start_peers(p2p_factory, 2)
    other_client = await p2p_factory(initial_peers=await best.get_visible_maddrs())
    await other_client.wait_for_at_least_n_peers(2, attempts=100, delay=0.05)
    sharing, state, asked, release = await _one_slot_donor(
        dht, best, prefix, max_queued_downloads=0, state_sharing_priority=5.0
    )
    _, older_state = await honest_donor(dht, older, prefix, seed=7, priority=older_priority)
    first = asyncio.create_task(load(client, dht, prefix))
    await asked.wait()  # the first download holds the only slot: the best donor answers busy from now on
    return first, other_client, state, older_state, release


@pytest.mark.timeout(60)
async def test_a_busy_best_donor_is_waited_for_rather_than_a_far_older_one_taken(dht, p2p_factory, prefix):
    first, client, state, _, release = await _busy_best_donor_and_an_older_one(dht, p2p_factory, prefix, 0.0)
    started = time.monotonic()
    second = asyncio.create_task(load(client, dht, prefix, timeout=30))
    await asyncio.sleep(1.5)
    assert not second.done(), "the newcomer took the far older donor's state while the best one was only busy"
    release.set()
    assert_state_equal(await first, state)
    assert_state_equal(await second, state)
    assert time.monotonic() - started < state_download.BUSY_PREFER_WINDOW


@pytest.mark.timeout(60)
async def test_a_donor_within_the_slack_is_taken_at_once(dht, p2p_factory, prefix):
    # (an optimizer's donor one epoch behind the busy one is in step with the swarm)
    first, client, _, older_state, release = await _busy_best_donor_and_an_older_one(dht, p2p_factory, prefix, 4.0)
    try:
        assert_state_equal(await asyncio.wait_for(load(client, dht, prefix, timeout=30), 5), older_state)
    finally:
        release.set()
        await first


@pytest.mark.timeout(60)
async def test_the_older_donor_is_taken_once_the_window_has_passed(dht, p2p_factory, prefix, monkeypatch):
    # a best donor that stays busy (or claims to, as a hostile one may) cannot keep newcomers from the others' state
    monkeypatch.setattr(state_download, "BUSY_PREFER_WINDOW", 1.0)
    first, client, _, older_state, release = await _busy_best_donor_and_an_older_one(dht, p2p_factory, prefix, 0.0)
    try:
        started = time.monotonic()
        assert_state_equal(await load(client, dht, prefix, timeout=30), older_state)
        assert time.monotonic() - started >= 0.9
    finally:
        release.set()
        await first
