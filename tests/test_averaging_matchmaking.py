"""Matchmaking between real peers (DHT processes and p2pd daemons on 127.0.0.1): groups form as the protocol says."""

import asyncio
import math

import pytest
from averaging_matchmaking_swarm import (
    assert_consistent,
    groups_of,
    look_for_groups,
    make_step,
    random_schema_hash,
    spy_on_declarations,
    swarm_context,
)

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import next_group_bits
from hivemind.averaging.matchmaking import MatchmakingException


async def test_two_peers_form_a_group():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2)
        results = await look_for_groups(peers, [make_step(gather=i) for i in range(2)])
        assert all(isinstance(result, GroupInfo) for result in results), results
        assert results[0] == results[1]
        assert set(results[0].peer_ids) == {peer.peer_id for peer in peers}
        assert len(results[0].group_id) == 20
        gathered = dict(zip(results[0].peer_ids, results[0].gathered))
        assert [gathered[peer.peer_id] for peer in peers] == [make_step(gather=i).data_for_gather for i in range(2)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_peers", [3, 8])
async def test_peers_without_target_size_form_one_group(num_peers):
    async with swarm_context() as swarm:
        peers = await swarm.add_many(num_peers, min_matchmaking_time=2.0)
        results = await look_for_groups(peers, [make_step(timeout=15) for _ in peers])
        assert_consistent(peers, results)
        assert [group.group_size for group in groups_of(results)] == [num_peers], results


@pytest.mark.timeout(60)
async def test_target_group_size_splits_the_swarm():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(8, target_group_size=4, min_matchmaking_time=2.0)
        results = await look_for_groups(peers, [make_step(timeout=15) for _ in peers])
        assert_consistent(peers, results)
        sizes = sorted(group.group_size for group in groups_of(results))
        assert sum(sizes) == 8 and max(sizes) <= 4 and len(sizes) >= 2, results


async def test_full_group_starts_before_the_declared_time():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2, target_group_size=2, min_matchmaking_time=30.0)
        results = await asyncio.wait_for(look_for_groups(peers, [make_step(timeout=60) for _ in peers]), 10)
        assert all(isinstance(result, GroupInfo) and result.group_size == 2 for result in results), results


async def test_group_smaller_than_min_group_size_is_disbanded():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2, min_group_size=3)
        results = await look_for_groups(peers, [make_step(timeout=2.5) for _ in peers])
        assert all(isinstance(result, MatchmakingException) for result in results), results
        leader_messages = [str(result) for result in results if "at most 2 of min_group_size=3" in str(result)]
        assert leader_messages, [str(result) for result in results]
        assert "too small at the deadline" in leader_messages[0] and "1 other peers seen" in leader_messages[0]


async def test_peers_with_different_schema_hash_never_group():
    async with swarm_context() as swarm:
        peers = [await swarm.add(schema_hash=random_schema_hash()) for _ in range(2)]
        results = await look_for_groups(peers, [make_step(timeout=2.5) for _ in peers])
        assert all(isinstance(result, MatchmakingException) for result in results), results
        for result in results:
            assert "schema hash differs from the peers seen: 1 of 1 peers" in str(result), str(result)


@pytest.mark.timeout(60)
async def test_schema_hash_splits_a_mixed_swarm():
    async with swarm_context() as swarm:
        first, second = random_schema_hash(), random_schema_hash()
        peers = [await swarm.add(schema_hash=schema) for schema in (first, second, first, second)]
        results = await look_for_groups(peers, [make_step(timeout=10) for _ in peers])
        assert_consistent(peers, results)
        assert all(isinstance(result, GroupInfo) for result in results), results
        assert results[0] == results[2] and results[1] == results[3] and results[0] != results[1]


async def test_peers_under_another_prefix_never_group():
    async with swarm_context() as swarm:
        peers = [await swarm.add(prefix=prefix) for prefix in ("one", "two")]
        results = await look_for_groups(peers, [make_step(timeout=2.5) for _ in peers])
        for result in results:
            assert isinstance(result, MatchmakingException) and "no other averagers were found" in str(result)


async def test_client_mode_peers_join_but_never_lead():
    async with swarm_context() as swarm:
        node = await swarm.add()
        clients = await swarm.add_many(2, client_mode=True, serve=True)
        declarations = spy_on_declarations([node, *clients])
        peers = [node, *clients]
        results = await look_for_groups(peers, [make_step(timeout=10) for _ in peers])
        assert_consistent(peers, results)
        assert all(isinstance(result, GroupInfo) and result.group_size == 3 for result in results), results
        assert {peer for peer, _ in declarations} == {node.peer_id}  # the clients never declared: nobody asks them


async def test_client_mode_swarm_never_forms_a_group():
    async with swarm_context() as swarm:
        clients = await swarm.add_many(3, client_mode=True, serve=True)
        declarations = spy_on_declarations(clients)
        results = await look_for_groups(clients, [make_step(timeout=2) for _ in clients])
        for result in results:
            assert isinstance(result, MatchmakingException), result
            assert "no other averagers were found under the key mm.0b" in str(result)
        assert declarations == [] and clients[0].dht.get("mm.0b", latest=True) is None


async def test_lonely_peer_says_no_peers_were_found():
    async with swarm_context() as swarm:
        (peer,) = await swarm.add_many(1)
        with pytest.raises(MatchmakingException, match="no other averagers were found under the key mm.0b"):
            await peer.matchmaking.look_for_group(make_step(timeout=1.5))
        assert not peer.matchmaking.is_looking_for_group


async def test_leaving_search_withdraws_the_declaration():
    async with swarm_context() as swarm:
        (peer,) = await swarm.add_many(1, min_matchmaking_time=30)
        key_manager = peer.matchmaking.group_key_manager
        search = asyncio.create_task(peer.matchmaking.look_for_group(make_step(timeout=60)))
        while not await key_manager.get_averagers("mm.0b", only_active=True):
            assert not search.done()
            await asyncio.sleep(0.05)
        ((_, expiration),) = await key_manager.get_averagers("mm.0b", only_active=True)
        search.cancel()
        with pytest.raises(asyncio.CancelledError):
            await search
        assert not peer.matchmaking.is_looking_for_group
        assert await key_manager.get_averagers("mm.0b", only_active=False) == [
            (peer.peer_id, math.nextafter(expiration, math.inf))
        ]
        assert await key_manager.get_averagers("mm.0b", only_active=True) == []


@pytest.mark.timeout(60)
async def test_group_bits_rotate_after_each_group():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2, initial_group_bits="0110")
        results = await look_for_groups(peers, [make_step(timeout=10) for _ in peers])
        assert all(isinstance(result, GroupInfo) for result in results), results
        group = results[0]
        for peer in peers:
            key_manager = peer.matchmaking.group_key_manager
            await key_manager.update_key_on_group_assembled(group)
            index = group.peer_ids.index(peer.peer_id)
            assert key_manager.group_bits == next_group_bits("0110", group.group_id, index, 2, None)
        bits = [peer.matchmaking.group_key_manager.group_bits for peer in peers]
        assert sorted(b[-1] for b in bits) == ["0", "1"] and all(b[:3] == "110" for b in bits)

        # give both peers the same bits again: they meet under the new key
        for peer in peers:
            peer.matchmaking.group_key_manager.group_bits = "1101"
        declarations = spy_on_declarations(peers)
        results = await look_for_groups(peers, [make_step(timeout=10) for _ in peers])
        assert all(isinstance(result, GroupInfo) for result in results), results
        assert {key for _, key in declarations} == {"mm.0b1101"}


async def test_peers_in_different_buckets_never_group():
    async with swarm_context() as swarm:
        peers = [await swarm.add(initial_group_bits=bits) for bits in ("0", "1")]
        results = await look_for_groups(peers, [make_step(timeout=2) for _ in peers])
        assert all(isinstance(result, MatchmakingException) for result in results), results
