"""Derived deadlines (no timeouts given) after the rounds they learn from. One round of a small vector on a fast
link, or one that waited out a stalled peer, made the next rounds' derived timeouts minutes to hours long (they
charged a full-sized part, for every sender at once, at the latency- or stall-dominated 'bandwidth'), so a peer that
stalled in a later round cost the others far more than one deadline."""

import asyncio
import os
import time

import pytest
import torch
from allreduce_helpers import call_reducer, collect, make_connected_peers, make_runner, sender_messages, start_routers
from async_wait import wait_until

from hivemind.averaging.deadlines import AdaptiveDeadlines
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES, TensorPartContainer

pytestmark = pytest.mark.timeout(30)

SIZE, PART_BYTES = 64, 64
FRACTIONS = [1.0, 1.0, 0.0]  # peers 0 and 1 reduce, peer 2 (a client) only sends


def test_a_fast_round_of_a_small_vector_keeps_the_floor_deadlines():
    deadlines = AdaptiveDeadlines()
    fresh = deadlines.for_round(4000, 3, DEFAULT_PART_SIZE_BYTES)
    deadlines.record_round(4000, 3, seconds=0.05)  # latency-bound: 4 KB in 50 ms
    assert deadlines.for_round(4000, 3, DEFAULT_PART_SIZE_BYTES) == fresh


def test_a_slow_round_of_a_small_vector_in_a_large_group_waits_at_most_the_round_for_a_part():
    deadlines = AdaptiveDeadlines()
    deadlines.record_round(4000, 16, seconds=1.0)  # 16 peers over the internet: latency-bound
    assert deadlines.for_round(4000, 16, DEFAULT_PART_SIZE_BYTES).sender_timeout <= 4 * 1.0 + 1.0


def test_a_large_vector_on_a_slow_link_still_gets_longer_deadlines():
    deadlines = AdaptiveDeadlines()
    deadlines.record_round(64 * 2**20, 2, seconds=64.0)  # 1 MiB/s: an honest slow link
    assert deadlines.for_round(64 * 2**20, 2, DEFAULT_PART_SIZE_BYTES).allreduce_timeout > 4 * 64


async def test_a_round_that_excluded_a_stalled_sender_is_not_a_link_measurement(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    values = [torch.randn(SIZE) for _ in range(3)]
    group_id = os.urandom(20)
    timeouts = dict(sender_timeout=0.5, reducer_timeout=1.0, peer_fractions=FRACTIONS, part_size_bytes=PART_BYTES)
    runners = [make_runner(peers[i], routers[i], peers, group_id, [values[i]], **timeouts) for i in (0, 1)]
    client = TensorPartContainer([values[2]], FRACTIONS, part_size_bytes=PART_BYTES)
    tasks = [asyncio.create_task(collect(runner)) for runner in runners]
    never = asyncio.Event()

    async def first_part_then_stall(reducer):
        yield sender_messages(client, reducer, group_id)[0]
        await never.wait()

    calls = [asyncio.create_task(call_reducer(peers[2], peers[r], first_part_then_stall(r))) for r in (0, 1)]
    try:
        await wait_until(lambda: all(runner.reducer.sender_progress[2] == 1 for runner in runners))
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert time.monotonic() - started < 5
        assert not any(runner.everyone_delivered for runner in runners)
        assert all(runner.needed_seconds is None for runner in runners)  # it stalled: no pace to learn from
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


async def test_a_round_where_everyone_delivered_is_a_link_measurement(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    values = [torch.randn(SIZE) for _ in range(2)]
    group_id = os.urandom(20)
    timeouts = dict(part_size_bytes=PART_BYTES, sender_timeout=5, reducer_timeout=10)
    runners = [make_runner(peers[i], routers[i], peers, group_id, [values[i]], **timeouts) for i in (0, 1)]
    deltas = await asyncio.wait_for(asyncio.gather(*(collect(runner) for runner in runners)), 10)
    torch.testing.assert_close(values[0] + deltas[0][0], (values[0] + values[1]) / 2)
    assert all(runner.everyone_delivered for runner in runners)


# a round that cut a slow sender: the next derived allreduce_timeout is stretched to its pace, within bounds
VECTOR, GROUP = 4000, 3  # loopback-sized: the derived allreduce_timeout is the 30 s floor


def test_a_round_that_cut_a_slow_sender_stretches_the_next_derived_round_to_its_pace():
    deadlines = AdaptiveDeadlines()
    first = deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES)
    deadlines.record_cut_round(first, needed_seconds=27.0)  # it would have ended at 27 s: 60% of 45 s
    stretched = deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES)
    assert stretched.allreduce_timeout == pytest.approx(45.0)
    assert (stretched.sender_timeout, stretched.reducer_timeout) == (first.sender_timeout, first.reducer_timeout)


def test_a_stalling_peer_stretches_it_at_most_twice_per_round_and_four_times_in_all():
    deadlines = AdaptiveDeadlines()
    timeouts = []
    for _ in range(4):
        round_deadlines = deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES)
        deadlines.record_cut_round(round_deadlines, needed_seconds=1e9)  # one part in a day
        timeouts.append(deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES).allreduce_timeout)
    assert timeouts == pytest.approx([60.0, 120.0, 120.0, 120.0])


def test_rounds_that_complete_fast_shrink_the_stretch_back():
    deadlines = AdaptiveDeadlines()
    for _ in range(2):
        deadlines.record_cut_round(deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES), needed_seconds=1e9)
    timeouts = []
    for _ in range(3):
        deadlines.record_round(VECTOR, GROUP, 0.05, deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES))
        timeouts.append(deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES).allreduce_timeout)
    assert timeouts == pytest.approx([60.0, 30.0, 30.0])


def test_a_round_that_completes_at_the_slow_pace_keeps_the_stretch():
    deadlines = AdaptiveDeadlines()
    deadlines.record_cut_round(deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES), needed_seconds=36.0)
    assert deadlines.stretch == 2.0
    # the slow sender is in: the round took as long as its pace said (a cut in the next round would undo it all)
    deadlines.record_round(VECTOR, GROUP, 36.0, deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES))
    assert deadlines.stretch == 2.0


def test_an_explicit_allreduce_timeout_is_never_stretched():
    deadlines = AdaptiveDeadlines(allreduce_timeout=20.0)
    deadlines.record_cut_round(deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES), needed_seconds=1e9)
    assert deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES).allreduce_timeout == 20.0
