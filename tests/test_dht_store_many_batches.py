"""store_many / get_many of thousands of keys on a small swarm of DHT processes: every replica gets every key."""

import functools
import os
import signal
import time

import pytest
from dht_swarm import launch_swarm, shutdown_all

import hivemind
from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

NUM_KEYS = 3000


async def _store_many(_dht, node, keys, values, expiration, **kwargs):
    return await node.store_many(keys, values, expiration, **kwargs)


async def _stored_values(_dht, node, keys):
    """What this node's own storage holds for each key (None if nothing)."""
    found = []
    for key in keys:
        item = node.protocol.storage.get(DHTID.generate(source=key))
        found.append(None if item is None else MSGPackSerializer.loads(item.value))
    return found


async def _get_many(_dht, node, keys):
    results = await node.get_many(keys)
    return [None if results[key] is None else results[key].value for key in keys]


def _shutdown(*dhts):
    for dht in dhts:
        dht.shutdown()


@pytest.mark.timeout(120)
def test_store_many_of_thousands_of_keys_reaches_every_replica_and_get_many_finds_them():
    first = hivemind.DHT(start=True)
    dhts = [first]
    try:
        for _ in range(2):  # initial peers chained: each newcomer joins through the last one
            dhts.append(hivemind.DHT(initial_peers=dhts[-1].get_visible_maddrs(), start=True))
        keys = [f"many_keys_{index}" for index in range(NUM_KEYS)]
        values = [index * 7 for index in range(NUM_KEYS)]
        stored = first.run_coroutine(
            functools.partial(_store_many, keys=keys, values=values, expiration=get_dht_time() + 300)
        )
        assert stored == dict.fromkeys(keys, True)
        # three peers, five replicas per key: each peer holds every key once store_many has returned
        for dht in dhts:
            held = dht.run_coroutine(functools.partial(_stored_values, keys=keys))
            assert sum(value is not None for value in held) == NUM_KEYS
            assert held == values

        reader = hivemind.DHT(initial_peers=dhts[-1].get_visible_maddrs(), client_mode=True, start=True)
        dhts.append(reader)  # a client holds nothing of its own: every value comes from the replicas
        assert reader.run_coroutine(functools.partial(_get_many, keys=keys)) == values
    finally:
        _shutdown(*dhts)


@pytest.mark.timeout(120)
def test_store_many_to_a_frozen_replica_reports_false_for_keys_that_reached_no_replica():
    first = hivemind.DHT(start=True)
    dhts = [first]
    frozen = None
    try:
        dhts.append(hivemind.DHT(initial_peers=first.get_visible_maddrs(), start=True))
        frozen = dhts[-1]
        keys = [f"frozen_replica_{index}" for index in range(NUM_KEYS)]
        os.kill(frozen.pid, signal.SIGSTOP)
        stored = first.run_coroutine(
            functools.partial(_store_many, keys=keys, values=keys, expiration=get_dht_time() + 300, exclude_self=True)
        )
        assert stored == dict.fromkeys(keys, False)  # the only other replica never answered
        stored = first.run_coroutine(
            functools.partial(_store_many, keys=keys, values=keys, expiration=get_dht_time() + 300)
        )
        assert stored == dict.fromkeys(keys, True)  # this peer is a replica and accepted them
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        _shutdown(*dhts)


async def _count_stored(_dht, node, keys):
    return sum(node.protocol.storage.get(DHTID.generate(source=key)) is not None for key in keys)


@pytest.mark.timeout(120)
def test_a_replica_silent_during_store_many_gets_the_keys_once_it_answers_again():
    first = hivemind.DHT(start=True)
    dhts = [first]
    frozen = None
    try:
        for _ in range(2):
            dhts.append(hivemind.DHT(initial_peers=first.get_visible_maddrs(), start=True))
        frozen = dhts[1]
        keys = [f"silent_replica_{index}" for index in range(NUM_KEYS)]
        os.kill(frozen.pid, signal.SIGSTOP)
        stored = first.run_coroutine(
            functools.partial(_store_many, keys=keys, values=keys, expiration=get_dht_time() + 300)
        )
        assert stored == dict.fromkeys(keys, True)  # this peer is a replica and accepted them
        os.kill(frozen.pid, signal.SIGCONT)
        frozen = None
        # the store's confirmation (a search after it) finds the replica answering again and sends it the keys
        deadline = time.monotonic() + 60
        while dhts[1].run_coroutine(functools.partial(_count_stored, keys=keys)) < NUM_KEYS:
            assert time.monotonic() < deadline, "the replica that was silent never received the keys"
            time.sleep(0.2)
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        _shutdown(*dhts)


@pytest.mark.timeout(60)
async def test_keys_with_large_subkeys_are_sent_in_requests_that_fit_a_message():
    nodes = await launch_swarm(2)
    try:
        # 40 entries of 200 KB subkeys: 8 MB in all, twice what one request may carry
        keys = [f"large_subkey_{index}" for index in range(40)]
        subkeys = [os.urandom(200_000) for _ in keys]
        stored = await nodes[0].store_many(keys, list(range(40)), get_dht_time() + 60, subkeys=subkeys)
        assert stored == {(key, subkey): True for key, subkey in zip(keys, subkeys)}
        for key, subkey in zip(keys, subkeys):
            held = nodes[1].protocol.storage.get(DHTID.generate(source=key))
            assert held is not None and subkey in held.value, key
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(60)
async def test_a_value_too_large_for_a_message_does_not_keep_the_other_keys_from_a_replica():
    nodes = await launch_swarm(2)
    try:
        keys = ["too_large"] + [f"small_beside_a_large_one_{index}" for index in range(100)]
        values = [b"x" * (5 << 20)] + list(range(100))
        stored = await nodes[0].store_many(keys, values, get_dht_time() + 60, exclude_self=True)
        assert stored == {key: key != "too_large" for key in keys}  # the remote replica refused no small key
        for key, value in zip(keys[1:], values[1:]):
            held = nodes[1].protocol.storage.get(DHTID.generate(source=key))
            assert held is not None and MSGPackSerializer.loads(held.value) == value, key
    finally:
        await shutdown_all(nodes)
