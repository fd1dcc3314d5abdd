"""Group keys: their format, the bit re-shuffling after a round (plain values), and declarations in a real DHT."""

import asyncio
import math
import random

import pytest

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import GroupKeyManager, is_valid_group, next_group_bits
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time


@pytest.mark.parametrize("key", ["mygroup.0b", "mygroup.0b0110", "a.0b1", "run_grad_averager.0b01"])
def test_valid_group_keys(key):
    assert is_valid_group(key)


@pytest.mark.parametrize("key", ["my.group.0b01", ".0b01", "mygroup.0b012", "mygroup.01", "mygroup", 42, None])
def test_invalid_group_keys(key):
    assert not is_valid_group(key)


def test_empty_bits_never_change():
    assert next_group_bits("", b"\x07" * 20, index=1, group_size=4, target_group_size=4) == ""


def test_new_bits_come_from_python_random_seeded_with_the_group_id():
    group_id = b"\x01" * 20
    # random.Random(b"\x01" * 20).sample(range(4), 4) == [1, 2, 3, 0]: member 2 takes bucket 3 = "11"
    assert random.Random(group_id).sample(range(4), 4) == [1, 2, 3, 0]
    assert next_group_bits("0000", group_id, index=2, group_size=4, target_group_size=4) == "0011"
    assert next_group_bits("0000", group_id, index=0, group_size=4, target_group_size=4) == "0001"
    # the old bits shift left and only the last len(bits) characters are kept
    assert next_group_bits("101", group_id, index=2, group_size=4, target_group_size=4) == "111"
    assert next_group_bits("1", group_id, index=3, group_size=4, target_group_size=4) == "0"


def test_open_group_size_draws_from_the_next_power_of_two():
    group_id = b"\x01" * 20
    # random.Random(b"\x01" * 20).sample(range(4), 3) == [1, 2, 3]: a group of 3 without a target uses 4 buckets
    assert next_group_bits("000000", group_id, index=1, group_size=3, target_group_size=None) == "000010"
    # .sample(range(8), 5) == [3, 5, 7, 2, 4]: a group of 5 without a target uses 8 buckets, three digits
    assert next_group_bits("000000", group_id, index=1, group_size=5, target_group_size=None) == "000101"
    # with a target, the target is the number of buckets: .sample(range(8), 3) == [3, 5, 7]
    assert next_group_bits("000000", group_id, index=2, group_size=3, target_group_size=8) == "000111"


def test_members_of_one_group_get_different_bits():
    group_id = bytes(range(20))
    bits = {next_group_bits("0110", group_id, index, 4, 4) for index in range(4)}
    assert len(bits) == 4 and all(len(b) == 4 and set(b) <= {"0", "1"} for b in bits)


def test_index_outside_the_group_is_refused():
    with pytest.raises(ValueError):
        next_group_bits("01", b"x", index=3, group_size=3, target_group_size=None)


@pytest.fixture
def dht():
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as instance:
        yield instance


def test_key_manager_refuses_bad_prefix_or_bits(dht):
    with pytest.raises(ValueError):
        GroupKeyManager(dht, "bad.prefix", "", None)
    with pytest.raises(ValueError):
        GroupKeyManager(dht, "prefix", "012", None)
    manager = GroupKeyManager(dht, "prefix", "01", 4)
    assert manager.current_key == "prefix.0b01"
    with pytest.raises(ValueError):
        manager.group_bits = "2"
    manager.group_bits = "1100"
    assert manager.current_key == "prefix.0b1100"


async def test_declare_and_withdraw_averager(dht):
    manager = GroupKeyManager(dht, "declare_test", "", None)
    alice, bob = PeerID(b"\x12\x20" + b"\x01" * 32), PeerID(b"\x12\x20" + b"\x02" * 32)
    expiration = get_dht_time() + 30
    assert await manager.declare_averager(manager.current_key, alice, expiration)
    assert await manager.declare_averager(manager.current_key, bob, expiration + 1)
    active = await manager.get_averagers(manager.current_key, only_active=True)
    assert sorted(active, key=lambda item: item[1]) == [(alice, expiration), (bob, expiration + 1)]

    # withdrawing overrides the True entry with the same expiration nudged to the next float
    assert await manager.declare_averager(manager.current_key, alice, expiration, looking_for_group=False)
    assert await manager.get_averagers(manager.current_key, only_active=True) == [(bob, expiration + 1)]
    everyone = dict(await manager.get_averagers(manager.current_key, only_active=False))
    assert everyone[alice] == math.nextafter(expiration, math.inf)
    raw = dht.get(manager.current_key, latest=True)
    assert raw.value[alice.to_bytes()].value is False and raw.value[bob.to_bytes()].value is True


async def test_malformed_entries_under_the_key_are_skipped(dht):
    manager = GroupKeyManager(dht, "malformed_test", "", None)
    expiration = get_dht_time() + 30
    peer = PeerID(b"\x12\x20" + b"\x03" * 32)
    assert await manager.declare_averager(manager.current_key, peer, expiration)
    assert dht.store(manager.current_key, "not a bool", expiration, subkey=b"\x12\x20" + b"\x04" * 32)
    assert dht.store(manager.current_key, True, expiration, subkey="a string subkey")
    assert await manager.get_averagers(manager.current_key, only_active=False) == [(peer, expiration)]


def test_update_key_on_group_assembled(dht):
    peers = [PeerID(b"\x12\x20" + bytes([i]) * 32) for i in range(4)]
    group = GroupInfo(group_id=b"\x01" * 20, peer_ids=tuple(peers), gathered=(b"",) * 4)
    manager = GroupKeyManager(dht, "rotate", "0000", 4, peer_id=peers[2])
    asyncio.run(manager.update_key_on_group_assembled(group))
    assert manager.group_bits == "0011" and manager.current_key == "rotate.0b0011"
