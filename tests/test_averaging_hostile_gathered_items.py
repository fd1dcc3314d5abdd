"""A group's gather payloads are each small (MAX_GATHER_BYTES), but a leader may list up to MAX_GROUP_SIZE members:
payloads of empty lists (one byte of msgpack, ~70 bytes of memory each) would make every member decode ~18 GB of
lists and spend minutes of its event loop on them. The whole group's gathered objects hold at most
MAX_GROUP_GATHER_ITEMS items: a member refuses a group beyond that once the budget is spent, and a leader admits no
follower that would take its group past it (real DHTs and p2pd daemons on 127.0.0.1 for the hostile leader)."""

import dataclasses
import os
import time

import pytest
import torch
from averaging_hostile_peer import Code, hostile_setup, item_bomb_gather, run_step

from hivemind.averaging.matchmaking_rules import MAX_GATHER_BYTES, LeaderState, check_join_request
from hivemind.averaging.payload import (
    MAX_GROUP_GATHER_ITEMS,
    MalformedGatherError,
    decode_group_gathered,
    encode_gather,
)
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

pytestmark = pytest.mark.timeout(90)


class _CountingPayloads(list):
    """The payloads of a group, counting how many of them were read."""

    read = 0

    def __iter__(self):
        for item in super().__iter__():
            self.read += 1
            yield item


def test_decoding_stops_once_the_group_budget_of_items_is_spent():
    bomb = item_bomb_gather()
    payloads = _CountingPayloads([bomb] * 16)
    peers = [PeerID(os.urandom(32)) for _ in range(16)]
    with pytest.raises(MalformedGatherError, match="items"):
        decode_group_gathered(peers, payloads)
    items_per_payload = 2 * (len(bomb) - 64)  # (each empty list counts as an item of its array and as an array)
    assert payloads.read <= MAX_GROUP_GATHER_ITEMS // items_per_payload + 1 < 16  # the rest was never decoded


def test_small_gathered_objects_of_a_large_group_are_decoded():
    peers = [PeerID(os.urandom(32)) for _ in range(1024)]
    infos, gathered = decode_group_gathered(
        peers, [encode_gather(1.0, 0, {"epoch": i, "ok": [1, 2]}) for i in range(1024)]
    )
    assert len(infos) == 1024 and gathered[peers[5]] == {"epoch": 5, "ok": [1, 2]}


def _leader_state(**overrides) -> LeaderState:
    state = LeaderState(
        peer_id=PeerID(b"\x01" * 34),
        looking_for_group=True,
        assembled=False,
        client_mode=False,
        schema_hash=b"schema",
        current_key="mm.0b",
        declared_expiration=100.0,
        current_leader=None,
        followers=set(),
        target_group_size=None,
    )
    return dataclasses.replace(state, **overrides)


def test_a_leader_admits_no_follower_whose_gathered_items_exceed_what_is_left_of_the_budget():
    request = averaging_pb2.JoinRequest(
        schema_hash=b"schema", expiration=200.0, group_key="mm.0b", gather=encode_gather(None, 0, list(range(100)))
    )
    requester = PeerID(b"\x02" * 34)
    assert check_join_request(_leader_state(gathered_items=MAX_GROUP_GATHER_ITEMS - 200), request, requester) is None
    refusal = check_join_request(_leader_state(gathered_items=MAX_GROUP_GATHER_ITEMS - 50), request, requester)
    assert refusal is not None and refusal.code == Code.GROUP_IS_FULL


async def test_a_group_of_item_bombs_fails_the_step_at_once_with_the_reason():
    fakes = [os.urandom(34) for _ in range(14)]
    async with hostile_setup([torch.zeros(64)], part_size_bytes=64) as (hostile, victim):

        def bomb_group(request, context):
            return averaging_pb2.MessageFromLeader(
                code=Code.BEGIN_ALLREDUCE,
                group_id=hostile.group_id,
                ordered_peer_ids=[hostile.p2p.peer_id.to_bytes(), context.remote_id.to_bytes(), *fakes],
                gathered=[hostile.gather, request.gather] + [item_bomb_gather()] * len(fakes),
            )

        hostile.make_group = bomb_group
        started = time.monotonic()
        outcome = await run_step(hostile, victim, timeout=30, allow_retries=False)
        assert hostile.joined.is_set()
        assert isinstance(outcome, Exception) and "items" in str(outcome), outcome
        assert time.monotonic() - started < 20


async def test_a_leader_that_changes_this_peers_gathered_data_is_refused_saying_so():
    """A leader that lists this NODE peer with an auxiliary payload made its step fail with 'the all-reduce
    returned 0 of 1 tensors', which named neither the leader nor the cause."""
    async with hostile_setup([torch.zeros(64)], part_size_bytes=64) as (hostile, victim):

        def tampered_group(request, context):
            return averaging_pb2.MessageFromLeader(
                code=Code.BEGIN_ALLREDUCE,
                group_id=hostile.group_id,
                ordered_peer_ids=[hostile.p2p.peer_id.to_bytes(), context.remote_id.to_bytes()],
                gathered=[encode_gather(None, 0, None), encode_gather(None, 2, None)],
            )

        hostile.make_group = tampered_group
        outcome = await run_step(hostile, victim, timeout=4, allow_retries=False)
        assert hostile.joined.is_set()
        assert isinstance(outcome, Exception) and "changed the gathered data of this peer" in str(outcome), outcome


def test_objects_of_registered_ext_types_count_for_what_they_cost():
    """An empty DictionaryDHTValue is 23 bytes of msgpack and ~460 bytes once decoded: counted as one item of its
    list, 64 payloads of them (~5 MB each) were all decoded within the budget."""
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.utils.serializer import MSGPackSerializer

    value = DictionaryDHTValue()
    count = (MAX_GATHER_BYTES - 64) // len(MSGPackSerializer.dumps(value))
    bomb = MSGPackSerializer.dumps([None, 0, MSGPackSerializer.dumps([value] * count)])
    payloads = _CountingPayloads([bomb] * 64)
    with pytest.raises(MalformedGatherError, match="items"):
        decode_group_gathered([PeerID(os.urandom(32)) for _ in range(64)], payloads)
    assert payloads.read <= 16
