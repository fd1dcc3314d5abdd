"""A node's blacklist of peers that failed to answer stays bounded when find answers name many made-up peers."""

import asyncio
import itertools

import pytest

from hivemind.dht import blacklist as dht_blacklist
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID

FAKES_PER_ANSWER = 256


def made_up_peer(number: int) -> PeerID:
    return PeerID(b"\x00\x24\x08\x01\x12\x20" + number.to_bytes(32, "big"))  # an identity multihash nobody serves


@pytest.mark.timeout(60)
async def test_blacklist_of_peers_named_by_find_answers_stays_bounded(monkeypatch):
    monkeypatch.setattr(dht_blacklist, "MAX_BLACKLIST_ENTRIES", 500, raising=False)
    hostile = await DHTNode.create()
    numbers = itertools.count()

    def made_up_neighbors(query_id, k, exclude=None):  # nearer to the key than any real node, each at a new peer
        return [(DHTID(int(query_id) ^ (i + 1)), made_up_peer(next(numbers))) for i in range(FAKES_PER_ANSWER)]

    try:
        victim = await DHTNode.create(initial_peers=await hostile.get_visible_maddrs())
        try:
            hostile.protocol.routing_table.get_nearest_neighbors = made_up_neighbors
            for i in range(4):
                assert await asyncio.wait_for(victim.get(f"key {i}"), 15) is None
            assert next(numbers) >= 4 * FAKES_PER_ANSWER  # every made-up peer was tried and failed
            assert len(victim.blacklist._banned) <= 500
            # a peer that failed just now is still banned
            assert made_up_peer(4 * FAKES_PER_ANSWER - 1) in victim.blacklist
        finally:
            await victim.shutdown()
    finally:
        await hostile.shutdown()
