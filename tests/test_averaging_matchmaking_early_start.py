"""A leader that has every peer its step expects starts the group without waiting out its matchmaking time (real
peers: DHT processes and p2pd daemons on 127.0.0.1); with a peer missing, or before its trigger, it waits as before."""

import asyncio
import time

import pytest
from averaging_matchmaking_swarm import assert_consistent, groups_of, look_for_groups, make_step, swarm_context

from hivemind.averaging.group_info import GroupInfo

LONG_MATCHMAKING = 30.0  # seconds: a group that forms well before this did not wait out the declared time


def expecting(expected: int, triggered: bool = True, timeout: float = 60.0):
    step = make_step(timeout=timeout)
    step.expected_group_size, step.triggered = expected, triggered
    return step


@pytest.mark.timeout(60)
async def test_a_leader_with_every_expected_peer_starts_without_waiting_out_its_matchmaking_time():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(3, min_matchmaking_time=LONG_MATCHMAKING)
        started = time.monotonic()
        results = await asyncio.wait_for(look_for_groups(peers, [expecting(3) for _ in peers]), LONG_MATCHMAKING / 2)
        assert_consistent(peers, results)
        assert [group.group_size for group in groups_of(results)] == [3], results
        assert time.monotonic() - started < LONG_MATCHMAKING / 2


@pytest.mark.timeout(60)
async def test_a_client_mode_peer_counts_among_the_expected_peers():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2, min_matchmaking_time=LONG_MATCHMAKING)
        peers.append(await swarm.add(client_mode=True, min_matchmaking_time=LONG_MATCHMAKING))
        results = await asyncio.wait_for(look_for_groups(peers, [expecting(3) for _ in peers]), LONG_MATCHMAKING / 2)
        assert_consistent(peers, results)
        assert [group.group_size for group in groups_of(results)] == [3], results


@pytest.mark.timeout(60)
async def test_a_leader_missing_an_expected_peer_waits_until_its_declared_time():
    async with swarm_context() as swarm:
        matchmaking_time = 3.0
        peers = await swarm.add_many(2, min_matchmaking_time=matchmaking_time)
        started = time.monotonic()
        results = await look_for_groups(peers, [expecting(3) for _ in peers])
        assert all(isinstance(result, GroupInfo) and result.group_size == 2 for result in results), results
        assert time.monotonic() - started >= matchmaking_time - 0.5  # the third peer was given its chance


@pytest.mark.timeout(60)
async def test_a_complete_group_waits_for_the_leaders_trigger_then_starts_at_once():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2, min_matchmaking_time=LONG_MATCHMAKING)
        steps = [expecting(2, triggered=False) for _ in peers]
        search = asyncio.ensure_future(look_for_groups(peers, steps))
        await asyncio.sleep(3.0)  # plenty for two peers on one host to find each other; nothing may start yet
        assert not search.done()
        for step in steps:
            step.triggered = True
        results = await asyncio.wait_for(search, 5.0)
        assert all(isinstance(result, GroupInfo) and result.group_size == 2 for result in results), results


@pytest.mark.timeout(60)
async def test_a_search_polls_the_group_key_soon_after_declaring_then_backs_off():
    async with swarm_context() as swarm:
        peer = await swarm.add(request_timeout=4.0, min_matchmaking_time=8.0)  # regular poll period: 1 s
        polls, original = [], peer.matchmaking._poll_dht

        async def poll_dht():
            polls.append(time.monotonic())
            await original()

        peer.matchmaking._poll_dht = poll_dht
        await look_for_groups([peer], [make_step(timeout=3.0)])
        gaps = [later - earlier for earlier, later in zip(polls, polls[1:])]
        # peers that start together miss each other's declaration at the first look: the next ones come quickly
        assert len([moment for moment in polls if moment - polls[0] < 2.5]) >= 4, gaps  # at 1 s periods: 3
        assert gaps[-1] > 0.5, gaps  # ...and the search then polls at its regular period
