"""A donor that refuses a download only because it already serves (or queues) as many as it allows still shares its
state: the newcomer asks it again after a pause, within its timeout, instead of returning None as if nobody shared
(1.1.12 serves every newcomer at once, however many come)."""

import asyncio
import time

import pytest
from test_averaging_state_sharing import assert_state_equal, load, make_state, prefix, serve, start_peers

import hivemind
from hivemind.averaging.state_sharing import StateSharing

__all__ = ["prefix"]  # the fixture, used below


@pytest.fixture(scope="module")
def dht():
    with hivemind.DHT(start=True) as instance:
        yield instance


async def _one_slot_donor(dht, donor, prefix, **kwargs):
    state, release, asked = make_state(seed=3), asyncio.Event(), asyncio.Event()

    async def slow_state():
        asked.set()
        await release.wait()
        return state[0], state[1], None

    sharing = StateSharing(
        dht=dht, peer_id=donor.peer_id, prefix=prefix, get_current_state=slow_state, max_concurrent_downloads=1,
        **kwargs,
    )  # fmt: skip
    await serve(donor, prefix, sharing.rpc_download_state)
    assert await sharing.declare()
    return sharing, state, asked, release


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "limits",
    [dict(max_queued_downloads=0), dict(max_queued_downloads=1, max_queue_wait=0.3)],
    ids=["queue-full", "queue-wait-ran-out"],
)
@pytest.mark.parametrize("timeout", [20.0, None], ids=["with-timeout", "without-timeout"])
async def test_newcomer_refused_by_a_busy_donor_gets_the_state_once_it_is_free(
    dht, p2p_factory, prefix, limits, timeout
):
    (donor,), client = await start_peers(p2p_factory, 1)
    other_client = await p2p_factory(initial_peers=await donor.get_visible_maddrs())
    await other_client.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    sharing, state, asked, release = await _one_slot_donor(dht, donor, prefix, **limits)

    first = asyncio.create_task(load(client, dht, prefix))
    await asked.wait()  # the first download holds the only slot
    started = time.monotonic()
    second = asyncio.create_task(load(other_client, dht, prefix, timeout=timeout))
    await asyncio.sleep(1.5)  # the second newcomer is refused (at once, or after its queue wait), maybe twice
    assert not second.done(), "the newcomer gave up on a donor that was only busy"
    release.set()
    assert_state_equal(await first, state)
    assert_state_equal(await second, state)
    assert time.monotonic() - started < 10  # asked again within a few seconds of the slot freeing
    assert sharing.slots.active == sharing.slots.waiting == 0
