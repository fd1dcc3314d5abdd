"""Beam search over an in-memory DHT graph: correctness, concurrency, early stopping, failures, no leaked tasks."""

import asyncio
import random
from typing import Dict, List

import pytest

from hivemind.dht import traverse as traverse_module
from hivemind.dht.routing import DHTID, RoutingTable
from hivemind.dht.traverse import simple_traverse_dht, traverse_dht

NUM_NODES, BUCKET_SIZE, BEAM_SIZE = 300, 8, 8
NUM_NEIGHBORS = 12  # neighbours per answer: a few more than the beam, as excluded nodes take places in answers


class FakeGraph:
    """Nodes with Kademlia routing tables that know every other node (a sparse graph: ~60 neighbours per node)."""

    def __init__(self, num_nodes: int, seed: int):
        rng = random.Random(seed)
        self.rng = rng
        self.nodes = [DHTID(rng.getrandbits(160)) for _ in range(num_nodes)]
        self.tables: Dict[DHTID, RoutingTable] = {}
        for node in self.nodes:
            table = RoutingTable(node, bucket_size=BUCKET_SIZE, depth_modulo=1)
            for other in rng.sample(self.nodes, len(self.nodes)):
                table.add_or_update_node(other, other)
            self.tables[node] = table
        self.dead: set = set()
        self.calls: List[tuple] = []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0

    def true_nearest(self, query: DHTID, k: int, alive_only: bool = True) -> List[DHTID]:
        candidates = [node for node in self.nodes if not (alive_only and node in self.dead)]
        return sorted(candidates, key=query.xor_distance)[:k]

    def neighbors_of(self, node: DHTID, query: DHTID) -> List[DHTID]:
        return [neighbor for neighbor, _ in self.tables[node].get_nearest_neighbors(query, NUM_NEIGHBORS)]

    async def get_neighbors(self, node: DHTID, queries) -> dict:
        self.calls.append((node, tuple(queries)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if node in self.dead:
            return {}
        return {query: (self.neighbors_of(node, query), False) for query in queries}


@pytest.fixture(scope="module")
def graph_template():
    return FakeGraph(NUM_NODES, seed=0)


@pytest.fixture
def graph(graph_template):
    graph_template.dead, graph_template.calls, graph_template.delay = set(), [], 0.0
    graph_template.in_flight = graph_template.max_in_flight = 0
    return graph_template


def random_queries(count: int, seed: int) -> List[DHTID]:
    rng = random.Random(seed)
    return [DHTID(rng.getrandbits(160)) for _ in range(count)]


async def test_simple_traverse_finds_true_nearest(graph):
    for query in random_queries(10, seed=1):
        start = graph.rng.sample(graph.nodes, 2)

        async def get_neighbors(node, query=query):
            return graph.neighbors_of(node, query), False

        nearest, visited = await simple_traverse_dht(query, start, BEAM_SIZE, get_neighbors)
        assert nearest == graph.true_nearest(query, BEAM_SIZE)
        assert set(nearest) <= visited and len(visited) < NUM_NODES // 3


async def test_traverse_finds_true_nearest_for_every_query(graph):
    queries = random_queries(30, seed=2)
    nearest, visited = await traverse_dht(
        queries, graph.rng.sample(graph.nodes, 3), BEAM_SIZE, num_workers=4, queries_per_call=4,
        get_neighbors=graph.get_neighbors,
    )  # fmt: skip
    assert set(nearest) == set(visited) == set(queries)
    for query in queries:
        assert nearest[query] == graph.true_nearest(query, BEAM_SIZE)
        assert set(nearest[query]) <= visited[query]
    assert len(graph.calls) < len(queries) * NUM_NODES // 4  # far from a flood of the whole graph


async def test_traverse_never_exceeds_num_workers_concurrent_calls(graph):
    graph.delay = 0.001
    await traverse_dht(
        random_queries(20, seed=3), graph.nodes[:3], BEAM_SIZE, num_workers=3, queries_per_call=2,
        get_neighbors=graph.get_neighbors,
    )  # fmt: skip
    assert graph.max_in_flight == 3


async def test_traverse_batches_at_most_queries_per_call(graph):
    await traverse_dht(
        random_queries(40, seed=4), graph.nodes[:3], BEAM_SIZE, num_workers=2, queries_per_call=5,
        get_neighbors=graph.get_neighbors,
    )  # fmt: skip
    batch_sizes = [len(queries) for _, queries in graph.calls]
    assert max(batch_sizes) == 5  # the shared start nodes are asked about several queries at once
    assert all(len(set(queries)) == len(queries) for _, queries in graph.calls)


async def test_traverse_never_asks_the_same_node_twice_about_one_query(graph):
    await traverse_dht(
        random_queries(20, seed=5), graph.nodes[:3], BEAM_SIZE, num_workers=4, queries_per_call=3,
        get_neighbors=graph.get_neighbors,
    )  # fmt: skip
    pairs = [(node, query) for node, queries in graph.calls for query in queries]
    assert len(pairs) == len(set(pairs))


async def test_should_stop_ends_only_that_query(graph):
    stop_query, other_query = random_queries(2, seed=6)
    holder = graph.true_nearest(stop_query, 1)[0]
    requested_for_stop_query = []

    async def get_neighbors(node, queries):
        answer = await graph.get_neighbors(node, queries)
        if stop_query in answer:
            requested_for_stop_query.append(node)
            answer[stop_query] = (answer[stop_query][0], node == holder)
        return answer

    nearest, visited = await traverse_dht(
        [stop_query, other_query], graph.nodes[:2], BEAM_SIZE, num_workers=1, queries_per_call=1,
        get_neighbors=get_neighbors,
    )  # fmt: skip
    assert requested_for_stop_query[-1] == holder  # nothing was requested for it after the stop
    assert holder in visited[stop_query]
    assert nearest[other_query] == graph.true_nearest(other_query, BEAM_SIZE)


async def test_dead_nodes_are_routed_around_and_left_out(graph):
    graph.dead = set(graph.rng.sample(graph.nodes, NUM_NODES // 10))
    start = [node for node in graph.nodes if node not in graph.dead][:3]
    queries = random_queries(20, seed=7)
    nearest, visited = await traverse_dht(queries, start, BEAM_SIZE, 4, 4, graph.get_neighbors)
    for query in queries:
        assert not set(nearest[query]) & graph.dead
        assert nearest[query] == graph.true_nearest(query, BEAM_SIZE, alive_only=True)


async def test_visited_nodes_are_neither_requested_nor_returned(graph):
    query = random_queries(1, seed=8)[0]
    excluded = set(graph.true_nearest(query, 3))  # e.g. the searching node itself: it starts from its own neighbours
    start = {neighbor for node in excluded for neighbor in graph.neighbors_of(node, query)} - excluded
    nearest, visited = await traverse_dht(
        [query], list(start), BEAM_SIZE, 2, 1, graph.get_neighbors, visited_nodes={query: excluded}
    )
    assert not excluded & {node for node, _ in graph.calls}
    assert not excluded & set(nearest[query]) and excluded <= visited[query]
    assert nearest[query] == [node for node in graph.true_nearest(query, BEAM_SIZE + 3) if node not in excluded]


async def test_query_without_initial_nodes_ends_empty(graph):
    query = random_queries(1, seed=9)[0]
    found = []

    async def found_callback(query, nearest, visited):
        found.append((query, nearest, visited))

    nearest, visited = await traverse_dht([query], [], BEAM_SIZE, 2, 1, graph.get_neighbors, None, found_callback)
    assert nearest == {query: []} and visited == {query: set()} and found == [(query, [], set())]
    assert graph.calls == []


async def test_found_callback_runs_once_per_query_with_final_results(graph):
    queries = random_queries(10, seed=10)
    found = {}

    async def found_callback(query, nearest, visited):
        assert query not in found
        await asyncio.sleep(0.01)
        found[query] = (nearest, visited)

    nearest, visited = await traverse_dht(
        queries, graph.nodes[:3], BEAM_SIZE, 3, 3, graph.get_neighbors, found_callback=found_callback
    )
    assert found == {query: (nearest[query], visited[query]) for query in queries}


async def test_without_await_all_tasks_callbacks_finish_in_background(graph):
    queries = random_queries(5, seed=11)
    release, found = asyncio.Event(), []

    async def found_callback(query, nearest, visited):
        await release.wait()
        found.append(query)

    nearest, _ = await traverse_dht(
        queries, graph.nodes[:3], BEAM_SIZE, 2, 2, graph.get_neighbors, found_callback=found_callback,
        await_all_tasks=False,
    )  # fmt: skip
    assert set(nearest) == set(queries) and found == []
    release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert sorted(found) == sorted(queries)


async def test_callbacks_left_running_belong_to_the_spawn_owner(graph):
    owned, release = set(), asyncio.Event()

    def spawn(coro):
        task = asyncio.create_task(coro)
        owned.add(task)
        return task

    async def found_callback(query, nearest, visited):
        await release.wait()

    queries = random_queries(3, seed=16)
    await traverse_dht(
        queries, graph.nodes[:3], BEAM_SIZE, 2, 2, graph.get_neighbors, found_callback=found_callback,
        await_all_tasks=False, spawn=spawn,
    )  # fmt: skip
    assert len(owned) == len(queries) and not any(task.done() for task in owned)
    assert not traverse_module._background_callbacks  # the module keeps nothing: the owner cancels and awaits
    for task in owned:
        task.cancel()
    await asyncio.gather(*owned, return_exceptions=True)


async def test_callbacks_cancelled_before_they_start_create_no_coroutine(graph):
    spawned, created = [], []

    def spawn_cancelled(coro):
        task = asyncio.create_task(coro)
        task.cancel()  # as a shutdown right after the search would
        spawned.append(task)
        return task

    def found_callback(query, nearest, visited):  # each call creates a coroutine that must then be awaited
        created.append(query)
        return asyncio.sleep(0)

    await traverse_dht(
        random_queries(3, seed=17), graph.nodes[:3], BEAM_SIZE, 2, 2, graph.get_neighbors,
        found_callback=found_callback, await_all_tasks=False, spawn=spawn_cancelled,
    )  # fmt: skip
    await asyncio.gather(*spawned, return_exceptions=True)
    assert len(spawned) == 3 and all(task.cancelled() for task in spawned)
    assert created == []  # else a coroutine was created and never awaited (a RuntimeWarning)


async def test_no_tasks_are_left_after_the_search(graph):
    graph.delay = 0.001
    before = asyncio.all_tasks()
    await traverse_dht(random_queries(10, seed=12), graph.nodes[:3], BEAM_SIZE, 4, 2, graph.get_neighbors)
    assert asyncio.all_tasks() == before


async def test_cancelling_the_search_cancels_its_workers_and_callbacks(graph):
    graph.delay = 0.01
    before = asyncio.all_tasks()
    search = asyncio.create_task(
        traverse_dht(random_queries(10, seed=13), graph.nodes[:3], BEAM_SIZE, 4, 2, graph.get_neighbors)
    )
    await asyncio.sleep(0.03)
    assert graph.in_flight > 0
    search.cancel()
    with pytest.raises(asyncio.CancelledError):
        await search
    assert graph.in_flight == 0 and asyncio.all_tasks() == before


async def test_get_neighbors_error_propagates_and_stops_everything(graph):
    graph.delay = 0.001
    before = asyncio.all_tasks()

    async def failing(node, queries):
        if len(graph.calls) >= 5:
            raise RuntimeError("broken get_neighbors")
        return await graph.get_neighbors(node, queries)

    with pytest.raises(RuntimeError, match="broken"):
        await traverse_dht(random_queries(10, seed=14), graph.nodes[:3], BEAM_SIZE, 4, 2, failing)
    assert graph.in_flight == 0 and asyncio.all_tasks() == before


async def test_failing_found_callback_is_logged_not_raised(graph):
    async def found_callback(query, nearest, visited):
        raise ValueError("callback bug")

    nearest, _ = await traverse_dht(
        random_queries(3, seed=15), graph.nodes[:3], BEAM_SIZE, 2, 2, graph.get_neighbors,
        found_callback=found_callback,
    )  # fmt: skip
    assert len(nearest) == 3


@pytest.mark.parametrize("bad", [dict(beam_size=0), dict(num_workers=0), dict(queries_per_call=0)])
async def test_invalid_parameters_are_rejected(graph, bad):
    params = dict(beam_size=BEAM_SIZE, num_workers=1, queries_per_call=1, **{})
    params.update(bad)
    with pytest.raises(ValueError):
        await traverse_dht([DHTID(1)], graph.nodes[:1], get_neighbors=graph.get_neighbors, **params)
