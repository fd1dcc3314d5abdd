"""The beam search over experts that runs inside the DHT process (and its plain logic), free of torch and numpy.

MoEBeamSearcher (hivemind.moe.client.beam_search) sends these coroutines to the DHT process, which imports this module
to run them: neither it nor the packages above it import torch, so the DHT process stays small (~40 MiB rather than
~540 MiB, see docs/moe.md).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from hivemind.dht import DHT, DHTNode
from hivemind.moe.client.negative_cache import recheck_negative_prefixes
from hivemind.moe.expert_uid import (
    FLAT_EXPERT,
    UID_DELIMITER,
    Coordinate,
    ExpertInfo,
    ExpertPrefix,
    Score,
    is_valid_uid,
    parse_peer_id,
)
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import get_dht_time

__all__ = ["parse_successors", "beam_search", "fill_beam", "top_distinct_experts", "count_other_peers"]

logger = get_logger(__name__)

PARALLEL_SEARCHES = 64  # samples of one batch searched at once (each waits for its own DHT lookups)

Successors = Dict[Coordinate, ExpertInfo]
BeamEntry = Tuple[Score, ExpertPrefix, Successors]
FetchSuccessors = Callable[[List[ExpertPrefix]], Awaitable[Dict[ExpertPrefix, Successors]]]


# ------------------------------------------------------------------ plain logic (no I/O)


def parse_successors(prefix: ExpertPrefix, found, grid_size: Optional[int] = None) -> Successors:
    """The valid entries of the dictionary stored under ``prefix`` (a DHT get result, or None).

    An entry is kept only if its subkey is an int coordinate below ``grid_size`` (or FLAT_EXPERT for the 1-D uid
    equal to the prefix itself) and its value is a pair (uid under that coordinate, base58 libp2p peer id). Anything
    else is dropped (with a debug log), and so is the ``None`` that negative caching stores.
    """
    if found is None or not isinstance(found.value, dict):
        return {}
    successors, dropped = {}, 0
    for coordinate, entry in found.value.items():
        if not isinstance(coordinate, int) or isinstance(coordinate, bool):
            continue
        value = getattr(entry, "value", None)
        if value is None:  # a negative-cache entry
            continue
        peer_id = None
        if (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and _is_successor(prefix, coordinate, value[0], grid_size)
        ):
            peer_id = parse_peer_id(value[1])
        if peer_id is None:
            dropped += 1
            continue
        successors[coordinate] = ExpertInfo(value[0], peer_id)
    if dropped:
        logger.debug(
            f"Beam search: ignored {dropped} invalid entries (bad uid, coordinate or peer id) under {prefix!r}"
        )
    return successors


def _is_successor(prefix: ExpertPrefix, coordinate: Coordinate, uid: object, grid_size: Optional[int]) -> bool:
    """Whether ``uid`` may be announced under ``prefix`` at ``coordinate``."""
    if not is_valid_uid(uid):
        return False
    if coordinate == FLAT_EXPERT:
        return uid + UID_DELIMITER == prefix
    if coordinate < 0 or (grid_size is not None and coordinate >= grid_size):
        return False
    expected = f"{prefix}{coordinate}"
    return uid == expected or uid.startswith(expected + UID_DELIMITER)


def _is_usable(score: float) -> bool:
    return not math.isnan(score) and score != -math.inf  # -inf marks a dropped index (e.g. switch grid dropout)


def top_distinct_experts(candidates: Sequence[Tuple[Score, ExpertInfo]], k: int) -> List[ExpertInfo]:
    """The ``k`` best-scoring experts, each uid at most once, best first."""
    chosen, seen = [], set()
    for _, info in sorted(candidates, key=lambda item: -item[0]):
        if info.uid not in seen:
            seen.add(info.uid)
            chosen.append(info)
            if len(chosen) == k:
                break
    return chosen


async def fill_beam(
    candidates: Sequence[Tuple[Score, ExpertPrefix]], beam_size: int, fetch: FetchSuccessors, batch_size: int
) -> List[BeamEntry]:
    """Fetch the best candidates' successors, a batch at a time, until ``beam_size`` prefixes have some."""
    ordered = sorted((item for item in candidates if _is_usable(item[0])), key=lambda item: -item[0])
    beam: List[BeamEntry] = []
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        found = await fetch([prefix for _, prefix in batch])
        for score, prefix in batch:
            if found.get(prefix):
                beam.append((score, prefix, found[prefix]))
        if len(beam) >= beam_size:
            break
    return heapq.nlargest(beam_size, beam, key=lambda entry: entry[0])


async def beam_search(
    uid_prefix: ExpertPrefix,
    grid_scores: Sequence[Sequence[float]],
    beam_size: int,
    fetch: FetchSuccessors,
    batch_size: Optional[int] = None,
) -> List[ExpertInfo]:
    """Up to ``beam_size`` distinct alive experts with the highest summed per-dimension scores, best first.

    :param grid_scores: one sequence of scores per grid dimension (its length is that dimension's size)
    :param fetch: returns the valid successors of each given prefix (see :func:`parse_successors`)
    """
    batch_size = max(batch_size or beam_size, beam_size, 1)
    if len(grid_scores) == 1 and uid_prefix.count(UID_DELIMITER) > 1:
        return await _search_sub_grid(uid_prefix, grid_scores[0], beam_size, fetch)
    initial = [(float(score), f"{uid_prefix}{index}{UID_DELIMITER}") for index, score in enumerate(grid_scores[0])]
    beam = await fill_beam(initial, beam_size, fetch, batch_size)
    if len(grid_scores) == 1:
        return top_distinct_experts(
            [(score, successors[FLAT_EXPERT]) for score, _, successors in beam if FLAT_EXPERT in successors],
            beam_size,
        )
    for dim in range(1, len(grid_scores)):
        dim_scores = grid_scores[dim]
        expanded = [
            (score + float(dim_scores[coordinate]), f"{prefix}{coordinate}{UID_DELIMITER}", info)
            for score, prefix, successors in beam
            for coordinate, info in successors.items()
            if 0 <= coordinate < len(dim_scores) and _is_usable(float(dim_scores[coordinate]))
        ]
        if dim == len(grid_scores) - 1:  # the last coordinate: only the expert with exactly these coordinates
            finished = [(score, info) for score, prefix, info in expanded if info.uid + UID_DELIMITER == prefix]
            return top_distinct_experts(finished, beam_size)
        beam = await fill_beam([(score, prefix) for score, prefix, _ in expanded], beam_size, fetch, batch_size)
    return []


async def _search_sub_grid(
    uid_prefix: ExpertPrefix, scores: Sequence[float], beam_size: int, fetch: FetchSuccessors
) -> List[ExpertInfo]:
    """A 1-D grid under a prefix that has coordinates (``ffn.1.`` holding ``ffn.1.0``, ``ffn.1.1``, ...): servers
    announce those experts as the successors of ``uid_prefix`` itself (only a 1-D uid such as ``ffn.5`` is stored
    under its own prefix with FLAT_EXPERT), so one lookup of ``uid_prefix`` finds them all."""
    successors = (await fetch([uid_prefix])).get(uid_prefix, {})
    candidates = [
        (float(scores[coordinate]), info)
        for coordinate, info in successors.items()
        if 0 <= coordinate < len(scores)
        and _is_usable(float(scores[coordinate]))
        and info.uid == f"{uid_prefix}{coordinate}"
    ]
    return top_distinct_experts(candidates, beam_size)


# ------------------------------------------------------------------ DHT-process side


class _SuccessorFetcher:
    """Fetches prefixes from the DHT at most once per search call; remembers missing ones for negative caching."""

    def __init__(
        self,
        node: DHTNode,
        uid_prefix: ExpertPrefix,
        grid_size: Sequence[int],
        negative_caching: bool,
        num_workers: int,
    ):
        self.node, self.grid_size, self.negative_caching = node, grid_size, negative_caching
        self.prefix_depth = uid_prefix.count(UID_DELIMITER)  # the grid's coordinates come after these delimiters
        self.num_workers = num_workers
        self.results: Dict[ExpertPrefix, asyncio.Future] = {}
        self.missing: List[ExpertPrefix] = []

    def _dimension_size(self, prefix: ExpertPrefix) -> Optional[int]:
        depth = prefix.count(UID_DELIMITER) - self.prefix_depth  # the grid coordinates this prefix already has
        return self.grid_size[depth] if 0 <= depth < len(self.grid_size) else None

    async def __call__(self, prefixes: List[ExpertPrefix]) -> Dict[ExpertPrefix, Successors]:
        new = [prefix for prefix in dict.fromkeys(prefixes) if prefix not in self.results]
        if new:
            loop = asyncio.get_running_loop()
            for prefix in new:
                self.results[prefix] = loop.create_future()
            try:
                found = await self.node.get_many(new, num_workers=self.num_workers)
                found = await recheck_negative_prefixes(self.node, found, self._is_empty, self.num_workers)
            except BaseException:
                for prefix in new:  # other samples waiting for these prefixes fail with this search
                    self.results[prefix].cancel()
                raise
            for prefix in new:
                if found[prefix] is None:
                    self.missing.append(prefix)
                self.results[prefix].set_result(parse_successors(prefix, found[prefix], self._dimension_size(prefix)))
        return {prefix: await self.results[prefix] for prefix in prefixes}

    def _is_empty(self, prefix: ExpertPrefix, found) -> bool:
        return not parse_successors(prefix, found, self._dimension_size(prefix))

    async def store_negative_cache(self, expiration: float) -> None:
        if self.negative_caching and self.missing:
            missing, self.missing = self.missing, []
            await self.node.store_many(
                missing,
                [None] * len(missing),
                get_dht_time() + expiration,
                subkeys=[FLAT_EXPERT] * len(missing),
                await_all_replicas=False,
            )


async def _search_many(
    dht: DHT,
    node: DHTNode,
    *,
    uid_prefix: str,
    grid_size: Tuple[int, ...],
    batch_scores: List[List[List[float]]],
    beam_size: int,
    negative_caching: bool,
    cache_expiration: float,
    num_workers: int,
) -> List[List[ExpertInfo]]:
    fetcher = _SuccessorFetcher(node, uid_prefix, grid_size, negative_caching, num_workers)
    results: List[List[ExpertInfo]] = [[] for _ in batch_scores]
    samples = iter(enumerate(batch_scores))

    async def search_samples():  # the searchers share one iterator: each sample is searched once
        for index, scores in samples:
            results[index] = await beam_search(uid_prefix, scores, beam_size, fetcher, num_workers)

    # a few searchers rather than one task per sample: most samples find their prefixes already fetched, and 20000
    # tasks cost the DHT process ~2 s of scheduling alone
    searchers = [asyncio.create_task(search_samples()) for _ in range(min(len(batch_scores), PARALLEL_SEARCHES))]
    try:
        await asyncio.gather(*searchers)
        return results
    finally:
        for searcher in searchers:  # when one failed (or the call was cancelled), the others' results are not needed
            searcher.cancel()
        await asyncio.gather(*searchers, return_exceptions=True)
        await fetcher.store_negative_cache(cache_expiration)


async def _get_initial_beam(
    dht, node, *, uid_prefix, grid_size, scores, beam_size, negative_caching, cache_expiration, num_workers
) -> List[BeamEntry]:
    fetcher = _SuccessorFetcher(node, uid_prefix, grid_size, negative_caching, num_workers)
    try:
        candidates = [(float(score), f"{uid_prefix}{index}{UID_DELIMITER}") for index, score in enumerate(scores)]
        return await fill_beam(candidates, beam_size, fetcher, max(beam_size, num_workers))
    finally:
        await fetcher.store_negative_cache(cache_expiration)


async def _get_active_successors(dht, node, *, prefixes, grid_size, num_workers) -> Dict[ExpertPrefix, Successors]:
    found = await node.get_many(prefixes, num_workers=num_workers)
    found = await recheck_negative_prefixes(
        node, found, lambda prefix, value: not parse_successors(prefix, value, grid_size), num_workers
    )
    return {prefix: parse_successors(prefix, found[prefix], grid_size) for prefix in prefixes}


async def count_other_peers(_dht: DHT, node: DHTNode) -> int:
    """Runs in the DHT process: how many other DHT peers its routing table holds."""
    return len(node.protocol.routing_table)
