"""AllReduceRunner and the number of parts a sender streams: fewer or more than the reducer owns (real p2pd peers).

Peers A and B reduce two parts each (16 float32 elements per part); client C only sends. C is driven by hand, so
that it can stream the wrong number of parts.
"""

import asyncio
import os

import pytest
import torch
from allreduce_helpers import (
    call_reducer,
    collect,
    hivemind_logs,
    make_connected_peers,
    make_runner,
    sender_messages,
    start_routers,
)

from hivemind.averaging.partition import TensorPartContainer
from hivemind.proto import averaging_pb2

__all__ = ["hivemind_logs"]  # the fixture, used by the tests below

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 64, 64
FRACTIONS = [1.0, 1.0, 0.0]
PARTS_PER_REDUCER = 2


async def _pair_and_client(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    values = [torch.randn(SIZE) for _ in range(3)]
    group_id = os.urandom(20)
    options = dict(peer_fractions=FRACTIONS, part_size_bytes=PART_BYTES, sender_timeout=5.0, reducer_timeout=10.0)
    runners = [make_runner(peers[i], routers[i], peers, group_id, [values[i]], **options) for i in (0, 1)]
    client = TensorPartContainer([values[2]], FRACTIONS, part_size_bytes=PART_BYTES)
    assert client.num_parts_by_peer == (PARTS_PER_REDUCER, PARTS_PER_REDUCER, 0)
    return peers, runners, values, group_id, client


def _exclusions_of(logs, peer):
    lines = [record.getMessage() for record in logs.records]
    return [line for line in lines if "excluded sender" in line and str(peer) in line]


def _assert_each_part_averaged_with_or_without(result, values, container, reducer):
    """Every part of ``reducer`` holds the mean of A and B, or of A, B and C (C's parts were well-formed)."""
    for part in container.parts_by_peer[reducer]:
        window = slice(part.start, part.stop)
        without = (values[0][window] + values[1][window]) / 2
        with_client = (values[0][window] + values[1][window] + values[2][window]) / 3
        got = result[window]
        assert torch.allclose(got, without, atol=1e-6) or torch.allclose(got, with_client, atol=1e-6)


async def test_a_sender_that_streams_too_few_parts_is_excluded(p2p_factory, hivemind_logs):
    peers, runners, values, group_id, client = await _pair_and_client(p2p_factory)
    tasks = [asyncio.create_task(collect(runner)) for runner in runners]
    for reducer in (0, 1):
        messages = sender_messages(client, reducer, group_id)[:1]  # then C closes its stream
        replies = await asyncio.wait_for(call_reducer(peers[2], peers[reducer], messages), 10)
        assert replies[-1].code != averaging_pb2.AVERAGED_PART  # the short stream is refused, not answered in full
    deltas = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    for i in (0, 1):
        result = values[i] + deltas[i][0]
        for reducer in (0, 1):
            parts = runners[0].container.parts_by_peer[reducer]
            for k, part in enumerate(parts):  # C delivered only its first part to each reducer
                window = slice(part.start, part.stop)
                senders = (0, 1, 2) if k == 0 else (0, 1)
                expected = sum(values[s][window] for s in senders) / len(senders)
                torch.testing.assert_close(result[window], expected, rtol=0, atol=1e-6)
    exclusions = _exclusions_of(hivemind_logs, peers[2].peer_id)
    assert len(exclusions) == 2 and all("ended after 1 of 2 parts" in line for line in exclusions), exclusions


async def test_a_sender_that_streams_more_parts_than_the_reducer_owns_is_excluded_with_a_logged_reason(
    p2p_factory, hivemind_logs
):
    peers, runners, values, group_id, client = await _pair_and_client(p2p_factory)
    tasks = [asyncio.create_task(collect(runner)) for runner in runners]
    replies_by_reducer = []
    for reducer in (0, 1):
        messages = sender_messages(client, reducer, group_id)
        extra = averaging_pb2.AveragingData(weight=1.0)
        extra.tensor_part.CopyFrom(messages[-1].tensor_part)  # a well-formed part past the reducer's last one
        replies = await asyncio.wait_for(call_reducer(peers[2], peers[reducer], messages + [extra]), 10)
        replies_by_reducer.append(replies)
    deltas = await asyncio.wait_for(asyncio.gather(*tasks), 20)  # the honest members still finish
    for i in (0, 1):
        for reducer in (0, 1):
            _assert_each_part_averaged_with_or_without(values[i] + deltas[i][0], values, client, reducer)
    exclusions = _exclusions_of(hivemind_logs, peers[2].peer_id)
    assert len(exclusions) == 2, f"C was not excluded for its extra part; replies: {replies_by_reducer}"
    assert all("sent more than the" in line for line in exclusions), exclusions
    # the replies to its parts go out before the extra part is seen (a sender need not end its stream to get them)
    for replies in replies_by_reducer:
        assert all(reply.code == averaging_pb2.AVERAGED_PART for reply in replies), replies
