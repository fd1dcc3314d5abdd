"""Ownership of a DHTNode's background work: loops survive errors, shutdown cancels and awaits every task."""

import asyncio

import pytest
from dht_swarm import launch_swarm, shutdown_all

from hivemind.dht import node_store, node_upkeep
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


async def serve_from_cache(node: DHTNode, key: str) -> None:
    """Cache a value that expires soon and get it: the node schedules a refresh 2.5 s before expiry."""
    node.protocol.cache.store(DHTID.generate(key), MSGPackSerializer.dumps(key), get_dht_time() + 3)
    assert (await node.get(key)).value == key


@pytest.mark.timeout(30)
async def test_bucket_refresh_loop_keeps_running_after_an_error():
    node = await DHTNode.create(refresh_timeout=0.1)
    calls, ran_again = [], asyncio.Event()

    async def failing_once(queries, *args, **kwargs):
        calls.append(queries)
        if len(calls) == 1:
            raise RuntimeError("injected failure of a bucket refresh")
        ran_again.set()
        return {}

    node.find_nearest_nodes = failing_once
    try:
        await asyncio.wait_for(ran_again.wait(), timeout=10)
        assert len(calls) >= 2
    finally:
        await node.shutdown()


@pytest.mark.timeout(30)
async def test_cache_refresh_loop_keeps_running_after_an_error(monkeypatch):
    monkeypatch.setattr(node_upkeep, "CACHE_REFRESH_RETRY_DELAY", 0.05)
    node = await DHTNode.create(cache_refresh_before_expiry=2.5)
    original_get = node.get_many_by_id
    refreshed, failed, ran_again = [], asyncio.Event(), asyncio.Event()

    async def refresh_failing_once(key_ids, *args, _is_refresh=False, **kwargs):
        if not _is_refresh:
            return await original_get(key_ids, *args, **kwargs)
        refreshed.append(list(key_ids))
        if len(refreshed) == 1:
            failed.set()
            raise RuntimeError("injected failure of a cache refresh")
        ran_again.set()
        return {}

    node.get_many_by_id = refresh_failing_once
    try:
        await serve_from_cache(node, "first")
        await asyncio.wait_for(failed.wait(), timeout=10)
        await serve_from_cache(node, "second")
        await asyncio.wait_for(ran_again.wait(), timeout=10)
        assert refreshed == [[DHTID.generate("first")], [DHTID.generate("second")]]
    finally:
        await node.shutdown()


@pytest.mark.timeout(30)
async def test_replica_confirmation_goes_on_after_a_failed_batch(monkeypatch):
    monkeypatch.setattr(node_store, "CONFIRM_REPLICAS_DELAY", 0.05)
    nodes = await launch_swarm(2)  # a small routing table: stores go to known nodes and are confirmed afterwards
    writer = nodes[0]
    original_find = writer.find_nearest_nodes
    searched, confirmed_again = [], asyncio.Event()

    async def find_failing_once(queries, *args, **kwargs):
        searched.append(list(queries))
        if len(searched) == 1:
            # stored while the first batch is being confirmed: it waits for the next batch of the same confirmer
            assert await writer.store("second", 2, get_dht_time() + 30)
            raise RuntimeError("injected failure of a replica confirmation")
        confirmed_again.set()
        return await original_find(queries, *args, **kwargs)

    writer.find_nearest_nodes = find_failing_once
    try:
        assert await writer.store("first", 1, get_dht_time() + 30)
        await asyncio.wait_for(confirmed_again.wait(), timeout=10)
        assert searched == [[DHTID.generate("first")], [DHTID.generate("second")]]
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(30)
async def test_traversal_callback_running_at_shutdown_is_cancelled_and_awaited():
    nodes = await launch_swarm(2)
    started, cleaned_up = asyncio.Event(), asyncio.Event()

    async def slow_on_done(query, nearest, visited):
        started.set()
        try:
            await asyncio.Event().wait()  # runs until cancelled
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # cleanup that takes a moment: shutdown must wait for it
            cleaned_up.set()
            raise

    try:
        await nodes[0]._beam_search([DHTID.generate("query")], 2, 1, {}, on_done=slow_on_done)
        await asyncio.wait_for(started.wait(), timeout=5)
        await nodes[0].shutdown()
        assert cleaned_up.is_set()
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(30)
async def test_no_task_of_a_node_is_pending_after_shutdown():
    before = asyncio.all_tasks()
    nodes = await launch_swarm(3, refresh_timeout=0.05, cache_refresh_before_expiry=1.0)
    release = asyncio.Event()

    async def waiting_on_done(query, nearest, visited):
        await release.wait()

    expiration = get_dht_time() + 30
    for i, node in enumerate(nodes):
        assert await node.store(f"key {i}", i, expiration)
    for i, node in enumerate(nodes):
        assert (await node.get(f"key {(i + 1) % len(nodes)}")).value == (i + 1) % len(nodes)
        await node._beam_search([DHTID.generate(f"query {i}")], 3, 2, {}, on_done=waiting_on_done)
    await shutdown_all(nodes)
    for node in nodes:
        assert not node._tasks and not node.protocol._background_tasks
    leftovers = [task for task in asyncio.all_tasks() - before if not task.done()]
    assert leftovers == []


@pytest.mark.timeout(30)
async def test_store_awaiting_replicas_returns_when_the_node_shuts_down():
    node = await DHTNode.create()
    try:
        store = asyncio.create_task(node.store("key", "value", get_dht_time() + 30))
        await asyncio.sleep(0)  # the store has spawned its per-key tasks and waits for their results
        await node.shutdown()  # cancels those tasks before they ever ran
        assert await asyncio.wait_for(store, timeout=5) is False
    finally:
        await node.shutdown()


@pytest.mark.timeout(30)
async def test_cache_refresh_loop_keeps_running_after_a_failed_search(monkeypatch):
    monkeypatch.setattr(node_upkeep, "CACHE_REFRESH_RETRY_DELAY", 0.05)
    node = await DHTNode.create(cache_refresh_before_expiry=2.5)
    original_search = node._beam_search
    searched, failed, ran_again = [], asyncio.Event(), asyncio.Event()

    async def search_failing_once(queries, *args, **kwargs):
        searched.append(list(queries))
        if len(searched) == 1:
            failed.set()
            raise RuntimeError("injected failure inside a refresh's search")
        ran_again.set()
        return await original_search(queries, *args, **kwargs)

    node._beam_search = search_failing_once
    try:
        await serve_from_cache(node, "first")
        await asyncio.wait_for(failed.wait(), timeout=10)
        await serve_from_cache(node, "second")
        await asyncio.wait_for(ran_again.wait(), timeout=10)
        assert searched == [[DHTID.generate("first")], [DHTID.generate("second")]]
    finally:
        await node.shutdown()
