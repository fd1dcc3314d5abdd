"""
Beam search over the DHT graph, independent of the network: the caller supplies an async
``get_neighbors`` function, so the search logic is tested against in-memory graphs.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Dict,
    Iterable,
    List,
    Optional,
    Set,
    Tuple,
)

from sortedcontainers import SortedList

from hivemind.dht.routing import DHTID
from hivemind.utils.logging import get_logger

__all__ = ["simple_traverse_dht", "traverse_dht", "GetNeighborsFn", "FoundCallback"]

logger = get_logger(__name__)

# get_neighbors(node, queries) -> {query: (neighbours of `node` near `query`, should_stop)}; a query missing from the
# answer (e.g. {} when the node did not respond) marks `node` as failed for that query
GetNeighborsFn = Callable[[DHTID, Collection[DHTID]], Awaitable[Dict[DHTID, Tuple[Collection[DHTID], bool]]]]
# found_callback(query, nearest nodes (nearest first), visited nodes) runs once per query when its search ends
FoundCallback = Callable[[DHTID, List[DHTID], Set[DHTID]], Awaitable[None]]

# spawn(coroutine) -> task: starts a found_callback as a task owned by the caller (who cancels and awaits it)
SpawnFn = Callable[[Coroutine], asyncio.Task]

# found_callback tasks that outlive traverse_dht(await_all_tasks=False) when the caller passed no `spawn` owner:
# a strong reference keeps them from being garbage-collected while they run
_background_callbacks: Set[asyncio.Task] = set()


async def simple_traverse_dht(
    query_id: DHTID,
    initial_nodes: Collection[DHTID],
    beam_size: int,
    get_neighbors: Callable[[DHTID], Awaitable[Optional[Tuple[Collection[DHTID], bool]]]],
    visited_nodes: Collection[DHTID] = (),
) -> Tuple[List[DHTID], Set[DHTID]]:
    """
    Sequential beam search for one query: repeatedly ask the nearest not yet visited node among the ``beam_size``
    nearest known ones for its neighbours, until all of those were visited or a node says ``should_stop``.

    :param get_neighbors: ``async (node) -> (neighbours, should_stop)``, or None if the node did not respond
    :param visited_nodes: nodes never to request nor return (e.g. the searching node itself)
    :returns: (up to ``beam_size`` nearest responsive-or-unvisited nodes, nearest first; every node visited,
      including ``visited_nodes``)
    """
    search = _QuerySearch(query_id, beam_size, initial_nodes, visited_nodes)
    while True:
        node = search.next_candidate()
        if node is None:
            break
        search.start_request(node)
        answer = await get_neighbors(node)
        if answer is None:
            search.on_failure(node)
            continue
        neighbors, should_stop = answer
        search.on_response(node, neighbors)
        if should_stop:
            break
    return search.nearest(), set(search.visited)


async def traverse_dht(
    queries: Collection[DHTID],
    initial_nodes: Collection[DHTID],
    beam_size: int,
    num_workers: int,
    queries_per_call: int,
    get_neighbors: GetNeighborsFn,
    visited_nodes: Optional[Dict[DHTID, Collection[DHTID]]] = None,
    found_callback: Optional[FoundCallback] = None,
    await_all_tasks: bool = True,
    spawn: Optional[SpawnFn] = None,
) -> Tuple[Dict[DHTID, List[DHTID]], Dict[DHTID, Set[DHTID]]]:
    """
    Parallel beam search for several queries at once, sharing requests between queries.

    Each query keeps the ``beam_size`` nearest nodes it knows of (nodes that failed to respond are dropped) and
    asks the nearest unvisited one of them for neighbours; its search ends when all of them were visited or a
    response says ``should_stop``. ``num_workers`` requests run concurrently; each worker serves the query with
    the fewest requests in flight, and the same request also carries up to ``queries_per_call - 1`` other queries
    for which that node is an unvisited beam member.

    :param queries: the ids to search for (duplicates are searched once)
    :param initial_nodes: where every query starts, e.g. the nearest nodes of the local routing table
    :param get_neighbors: ``async (node, queries) -> {query: (neighbours, should_stop)}``; a query absent from the
      answer (e.g. ``{}``: the node did not respond) marks the node as failed for that query. Exceptions propagate:
      the search is cancelled and the exception re-raised, so network errors should be turned into ``{}``.
    :param visited_nodes: per query, nodes never to request nor return (e.g. the searching node itself)
    :param found_callback: ``async (query, nearest, visited)``, started as soon as that query's search ends
    :param await_all_tasks: if True, return only after every found_callback finished; if False, return once all
      searches ended, leaving unfinished callbacks to run in the background (their errors are logged)
    :param spawn: starts each found_callback task, e.g. a method of the caller that adds the task to a set which the
      caller's shutdown cancels and awaits; pass it with ``await_all_tasks=False`` so that every callback still
      running has an owner. Default: ``asyncio.create_task``, callbacks left running are referenced by this module.
    :returns: (per query: up to ``beam_size`` nearest nodes, nearest first; per query: all nodes visited,
      including its ``visited_nodes``)
    """
    if beam_size < 1 or num_workers < 1 or queries_per_call < 1:
        raise ValueError(
            f"beam_size, num_workers, queries_per_call must be >= 1: {beam_size, num_workers, queries_per_call}"
        )
    visited_nodes = visited_nodes or {}
    searches = {
        query: _QuerySearch(query, beam_size, initial_nodes, visited_nodes.get(query, ())) for query in queries
    }
    scheduler = _Scheduler(searches, queries_per_call, get_neighbors, found_callback, spawn or asyncio.create_task)
    workers = [asyncio.create_task(scheduler.run_worker()) for _ in range(num_workers)] if scheduler.active else []
    try:
        await asyncio.gather(*workers)
        if await_all_tasks:
            await asyncio.gather(*scheduler.callbacks)
    except BaseException:
        for task in workers + scheduler.callbacks:
            task.cancel()
        await asyncio.gather(*workers, *scheduler.callbacks, return_exceptions=True)
        raise
    if spawn is None:
        for task in scheduler.callbacks:
            if not task.done():
                _background_callbacks.add(task)
                task.add_done_callback(_background_callbacks.discard)
    nearest = {query: search.result_nearest for query, search in searches.items()}
    visited = {query: search.result_visited for query, search in searches.items()}
    return nearest, visited


class _QuerySearch:
    """The beam of one query: known nodes ranked by distance, each unvisited, in flight, visited or failed."""

    UNVISITED, IN_FLIGHT, VISITED, FAILED, EXCLUDED = range(5)

    def __init__(self, query: DHTID, beam_size: int, initial_nodes: Iterable[DHTID], excluded: Iterable[DHTID]):
        self.query, self.beam_size = query, beam_size
        self.status: Dict[DHTID, int] = {node: self.EXCLUDED for node in excluded}
        self.visited: Set[DHTID] = set(self.status)
        self.ranked = SortedList()  # (distance, node) of every known node that has not failed
        self.in_flight = 0
        self.finished = False
        self.result_nearest: List[DHTID] = []
        self.result_visited: Set[DHTID] = set()
        self.add_candidates(initial_nodes)

    def add_candidates(self, nodes: Iterable[DHTID]) -> List[DHTID]:
        """Learn about nodes; returns those that were not known before."""
        added = []
        for node in nodes:
            if node not in self.status:
                self.status[node] = self.UNVISITED
                self.ranked.add((self.query ^ node, node))
                added.append(node)
        return added

    def next_candidate(self) -> Optional[DHTID]:
        """The nearest unvisited node among the beam_size nearest known ones, if any."""
        for _, node in self.ranked.islice(0, self.beam_size):
            if self.status[node] == self.UNVISITED:
                return node
        return None

    def is_candidate(self, node: DHTID) -> bool:
        """Whether ``node`` is unvisited and among the beam_size nearest known nodes."""
        if self.status.get(node) != self.UNVISITED:
            return False
        return self.ranked.bisect_left((self.query ^ node, node)) < self.beam_size

    def unvisited(self) -> List[DHTID]:
        return [node for node, status in self.status.items() if status == self.UNVISITED]

    def start_request(self, node: DHTID) -> None:
        self.status[node] = self.IN_FLIGHT
        self.in_flight += 1

    def on_response(self, node: DHTID, neighbors: Iterable[DHTID]) -> List[DHTID]:
        """Record an answer; returns the neighbours that were new to this query."""
        self.status[node] = self.VISITED
        self.visited.add(node)
        self.in_flight -= 1
        return self.add_candidates(neighbors)

    def on_failure(self, node: DHTID) -> None:
        self.status[node] = self.FAILED
        self.visited.add(node)
        self.in_flight -= 1
        self.ranked.remove((self.query ^ node, node))

    def is_exhausted(self) -> bool:
        return self.in_flight == 0 and self.next_candidate() is None

    def nearest(self) -> List[DHTID]:
        return [node for _, node in self.ranked.islice(0, self.beam_size)]

    def finish(self) -> None:
        """Freeze the results: later responses for this query are ignored."""
        self.finished = True
        self.result_nearest, self.result_visited = self.nearest(), set(self.visited)


class _Scheduler:
    """
    Hands (node, queries) requests to workers and applies the answers; owns the found_callback tasks.

    Two indices keep each choice cheap with thousands of queries: ``_ready[n]`` holds the searches that have a
    node to request and ``n`` requests in flight; ``_unvisited_by[node]`` holds the searches that know ``node``
    but have not requested it yet (the candidates for sharing a request to that node). Both are OrderedDicts: they
    are read from the front while entries leave from the front, and finding the first entry of a plain dict scans
    every entry deleted before it (one get_many of 20000 keys spent most of a minute there).
    """

    def __init__(
        self,
        searches: Dict[DHTID, _QuerySearch],
        queries_per_call: int,
        get_neighbors: GetNeighborsFn,
        found_callback: Optional[FoundCallback],
        spawn: SpawnFn,
    ):
        self.active: Dict[DHTID, _QuerySearch] = dict(searches)
        self.queries_per_call, self.get_neighbors = queries_per_call, get_neighbors
        self.found_callback, self.spawn = found_callback, spawn
        self.callbacks: List[asyncio.Task] = []
        self._changed = asyncio.Event()
        self._ready: Dict[int, OrderedDict[DHTID, _QuerySearch]] = {}
        self._ready_level: Dict[DHTID, int] = {}
        self._unvisited_by: Dict[DHTID, OrderedDict[DHTID, _QuerySearch]] = {}
        for search in list(self.active.values()):
            if search.is_exhausted():
                self._finish(search)
            else:
                self._index_unvisited(search, search.unvisited())
                self._update_readiness(search)

    def _index_unvisited(self, search: _QuerySearch, nodes: Iterable[DHTID]) -> None:
        for node in nodes:
            self._unvisited_by.setdefault(node, OrderedDict())[search.query] = search

    def _unindex_unvisited(self, search: _QuerySearch, node: DHTID) -> None:
        searches = self._unvisited_by.get(node)
        if searches is not None:
            searches.pop(search.query, None)
            if not searches:
                del self._unvisited_by[node]

    def _update_readiness(self, search: _QuerySearch) -> None:
        old_level = self._ready_level.pop(search.query, None)
        if old_level is not None:
            del self._ready[old_level][search.query]
            if not self._ready[old_level]:
                del self._ready[old_level]
        if not search.finished and search.next_candidate() is not None:
            self._ready.setdefault(search.in_flight, OrderedDict())[search.query] = search
            self._ready_level[search.query] = search.in_flight

    def _finish(self, search: _QuerySearch) -> None:
        search.finish()
        del self.active[search.query]
        self._update_readiness(search)
        for node in search.unvisited():
            self._unindex_unvisited(search, node)
        if self.found_callback is not None:
            nearest, visited = list(search.result_nearest), set(search.result_visited)
            self.callbacks.append(self.spawn(_run_found_callback(self.found_callback, search.query, nearest, visited)))

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _next_request(self) -> Optional[Tuple[DHTID, List[_QuerySearch]]]:
        """The search with the fewest requests in flight asks its nearest unvisited node, for other searches too."""
        if not self._ready:
            return None
        least_busy = self._ready[min(self._ready)]
        chosen = next(iter(least_busy.values()))
        node = chosen.next_candidate()
        batch = [chosen]
        searches_knowing_node = self._unvisited_by.get(node, {})
        out_of_beam = []
        # reads only as far as the batch needs, not every search that knows the node (each one read leaves the index)
        for query, search in searches_knowing_node.items():
            if len(batch) >= self.queries_per_call:
                break
            if search is chosen:
                continue
            if search.is_candidate(node):
                batch.append(search)
            else:  # out of that beam (it may only come back after failures): stop offering it for sharing
                out_of_beam.append(query)
        for query in out_of_beam:
            del searches_knowing_node[query]
        for search in batch:
            search.start_request(node)
            self._unindex_unvisited(search, node)
            self._update_readiness(search)
        return node, batch

    async def run_worker(self) -> None:
        while self.active:
            request = self._next_request()
            if request is None:
                await self._changed.wait()  # every search is waiting for requests in flight
                continue
            node, batch = request
            answer = await self.get_neighbors(node, [search.query for search in batch]) or {}
            for search in batch:
                if not search.finished:
                    self._apply_answer(search, node, answer.get(search.query))
            self._notify()

    def _apply_answer(self, search: _QuerySearch, node: DHTID, result: Optional[Tuple[Collection[DHTID], bool]]):
        if result is None:
            search.on_failure(node)
        else:
            neighbors, should_stop = result
            self._index_unvisited(search, search.on_response(node, neighbors))
            if should_stop:
                self._finish(search)
                return
        if search.is_exhausted():
            self._finish(search)
        else:
            self._update_readiness(search)


async def _run_found_callback(
    found_callback: FoundCallback, query: DHTID, nearest: List[DHTID], visited: Set[DHTID]
) -> None:
    """
    Run one found_callback and log its error. The callback is called here, inside the task: a task cancelled before
    it started then leaves no callback coroutine that was created but never awaited.
    """
    try:
        await found_callback(query, nearest, visited)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.warning(f"found_callback for query {query!r} failed: {e!r}", exc_info=True)
