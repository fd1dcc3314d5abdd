"""
Getting values on a DHTNode: one search per key (shared by concurrent gets of that key), stopped as soon as an entry
fresh enough is found; found values are cached locally and pushed into the caches of the nearest nodes that lack them.
"""

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Collection, Dict, List, Optional, Set, Union

from hivemind.dht.blacklist import Blacklist
from hivemind.dht.protocol import DHTProtocol, StoredValue
from hivemind.dht.routing import DHTID, DHTKey, DHTValue
from hivemind.dht.search_state import KeySearch
from hivemind.dht.storage import CacheRefreshQueue, DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import DHTExpiration, ValueWithExpiration, get_dht_time

logger = get_logger(__name__)

# a get may join a running search for the same key that began at most this many seconds earlier (and was started with
# a sufficient_expiration_time at most this much lower, e.g. two gets with the default "now", a moment apart); an older
# search may have found its entries before a newer store was acknowledged (it can wait seconds for a silent peer)
REUSE_GET_TOLERANCE = 1.0


@dataclass
class PendingGet:
    """A running search for one key and the futures of every get() waiting for it."""

    search: KeySearch
    futures: List[asyncio.Future] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def abandoned(self) -> bool:
        return all(future.done() for future in self.futures)

    def can_join(self, sufficient_expiration_time: DHTExpiration, now: float) -> bool:
        """Whether a get with ``sufficient_expiration_time``, made at ``now`` (time.monotonic), may wait for this
        search instead of starting its own: one that began recently enough and asked for fresh enough entries, still
        running, and with a waiter left (a search whose waiters all left stops at its next answer, before it
        finished: a get joining it then would get that early end, e.g. None for a value that exists)."""
        return (
            self.search.sufficient_expiration_time >= sufficient_expiration_time - REUSE_GET_TOLERANCE
            and self.started >= now - REUSE_GET_TOLERANCE
            and not self.search.finished
            and not self.abandoned
        )


class SearchingGet:
    """
    The get methods of :class:`~hivemind.dht.node.DHTNode` (a mixin: it uses the node's protocol, beam search,
    blacklist, cache refresh queue and task ownership).
    """

    # provided by DHTNode
    node_id: DHTID
    protocol: DHTProtocol
    blacklist: Blacklist
    num_workers: int
    reuse_get_requests: bool
    cache_locally: bool
    cache_nearest: int
    cache_refresh_before_expiry: float
    cache_refresh_queue: CacheRefreshQueue
    _cache_refresh_wakeup: asyncio.Event
    _pending_gets: Dict[DHTID, List[PendingGet]]
    _spawn: Callable[[Awaitable], asyncio.Task]
    _beam_search: Callable[..., Awaitable[Any]]

    async def get(self, key: DHTKey, latest: bool = False, **kwargs) -> Optional[ValueWithExpiration[DHTValue]]:
        """
        The value stored under ``key`` (None if not found). ``latest=True`` searches the whole beam for the entry
        with the greatest expiration instead of stopping at the first non-expired one.
        """
        if latest:  # no entry is good enough: visit the whole beam, keep the newest
            kwargs.update(sufficient_expiration_time=math.inf)
        return (await self.get_many([key], **kwargs))[key]

    async def get_many(
        self,
        keys: Collection[DHTKey],
        sufficient_expiration_time: Optional[DHTExpiration] = None,  # default: now
        **kwargs,
    ) -> Dict[DHTKey, Union[Optional[ValueWithExpiration[DHTValue]], Awaitable]]:
        """Get several keys at once; see get_many_by_id for the options."""
        keys = list(keys)
        if any(key is None for key in keys):  # it would hash to a random id: nothing could ever be found
            raise TypeError("a DHT key cannot be None: pass the str, bytes or number the value was stored under")
        key_ids = list(map(DHTID.generate, keys))
        results = await self.get_many_by_id(key_ids, sufficient_expiration_time, **kwargs)
        return {key: results[key_id] for key, key_id in zip(keys, key_ids)}

    async def get_many_by_id(
        self,
        key_ids: Collection[DHTID],
        sufficient_expiration_time: Optional[DHTExpiration] = None,  # default: now
        num_workers: Optional[int] = None,
        beam_size: Optional[int] = None,
        return_futures: bool = False,
        _is_refresh: bool = False,
    ) -> Dict[DHTID, Union[Optional[ValueWithExpiration[DHTValue]], Awaitable]]:
        """
        Search for the values of key ids: a key's search ends once it finds an entry expiring at or after
        ``sufficient_expiration_time`` (default: now) or after visiting its nearest nodes.

        :param return_futures: return an asyncio future per key at once; cancelling one stops that key's search
        :returns: {key_id: ValueWithExpiration or None}, or {key_id: future} with return_futures
        """
        sufficient_expiration_time = (
            sufficient_expiration_time if sufficient_expiration_time is not None else get_dht_time()
        )
        loop = asyncio.get_running_loop()
        key_ids = list(dict.fromkeys(key_ids))
        futures = {key_id: loop.create_future() for key_id in key_ids}
        new_searches: Dict[DHTID, PendingGet] = {}
        for key_id in key_ids:
            if self.reuse_get_requests and not _is_refresh:
                now, running = time.monotonic(), self._pending_gets.get(key_id, ())
                joined = next((p for p in running if p.can_join(sufficient_expiration_time, now)), None)
                if joined is not None:
                    joined.futures.append(futures[key_id])
                    continue
            pending = PendingGet(KeySearch(key_id, sufficient_expiration_time), [futures[key_id]])
            self._pending_gets[key_id].append(pending)
            new_searches[key_id] = pending

        if new_searches:
            self._spawn(self._search(new_searches, num_workers or self.num_workers, beam_size, _is_refresh))
        if return_futures:
            return futures
        try:
            return {key_id: await future for key_id, future in futures.items()}
        except asyncio.CancelledError:
            for future in futures.values():  # a search whose every waiter is gone stops at its next answer
                future.cancel()
            raise

    def _finish(self, pending: PendingGet) -> None:
        """Report a key's best entry to its waiters, cache it locally, and retire the search."""
        search = pending.search
        if search.finished:
            return
        search.finished = True
        pending_list = self._pending_gets.get(search.key_id, [])
        if pending in pending_list:
            pending_list.remove(pending)
            if not pending_list:
                del self._pending_gets[search.key_id]
        result = self._deserialize(search.key_id, search.best) if search.best is not None else None
        for future in pending.futures:
            if not future.done():
                future.set_result(result)
        if search.best is not None and self.cache_locally and self.node_id not in search.sources:
            self.protocol.cache.store(search.key_id, search.best.value, search.best.expiration_time)

    def _offer_to_running_gets(
        self, key_id: DHTID, subkey: Optional[Any], value: bytes, expiration_time: DHTExpiration
    ) -> None:
        """
        Make an entry that this node stored (and a replica accepted) a candidate of the running searches of its key:
        a get that joins such a search after the store was acknowledged must not return an older entry that the
        search found before (a search may wait for a silent peer for a while).
        """
        if subkey is None:
            candidate = ValueWithExpiration(value, expiration_time)
        else:
            dictionary = DictionaryDHTValue()
            dictionary.store(subkey, value, expiration_time)
            candidate = ValueWithExpiration(dictionary, expiration_time)
        for pending in list(self._pending_gets.get(key_id, ())):
            if not pending.search.finished and pending.search.add_candidate(candidate, self.node_id):
                if pending.search.satisfied:
                    self._finish(pending)

    def _deserialize(
        self, key_id: DHTID, item: ValueWithExpiration[StoredValue]
    ) -> Optional[ValueWithExpiration[DHTValue]]:
        """Strip validator suffixes and decode msgpack; a dictionary becomes {subkey: ValueWithExpiration}."""
        validator, key_bytes = self.protocol.record_validator, key_id.to_bytes()

        def decode(subkey_bytes: bytes, value: bytes, expiration: DHTExpiration) -> DHTValue:
            if validator is not None:
                value = validator.strip_value(DHTRecord(key_bytes, subkey_bytes, value, expiration))
            return MSGPackSerializer.loads(value)

        try:
            if isinstance(item.value, DictionaryDHTValue):
                decoded = {
                    subkey: ValueWithExpiration(
                        decode(MSGPackSerializer.dumps(subkey), entry.value, entry.expiration_time),
                        entry.expiration_time,
                    )
                    for subkey, entry in item.value.items()
                }
                return ValueWithExpiration(decoded, item.expiration_time)
            return ValueWithExpiration(
                decode(DHTProtocol.IS_REGULAR_VALUE, item.value, item.expiration_time), item.expiration_time
            )
        except Exception as e:
            logger.warning(f"Could not decode the value of key {key_id!r}: {e!r}")
            return None

    async def _search(
        self, searches: Dict[DHTID, PendingGet], num_workers: int, beam_size: Optional[int], is_refresh: bool
    ) -> None:
        try:
            remaining: Dict[DHTID, PendingGet] = {}
            for key_id, pending in searches.items():
                pending.search.add_candidate(self.protocol.storage.get(key_id), self.node_id)
                if not is_refresh:
                    cached = self.protocol.cache.get(key_id)
                    if pending.search.add_candidate(cached, self.node_id) and pending.search.satisfied:
                        self._schedule_cache_refresh(key_id, cached.expiration_time)
                if pending.search.satisfied:
                    self._finish(pending)
                else:
                    remaining[key_id] = pending
            if not remaining:
                return

            def on_find(key_id: DHTID, node_id: DHTID, found: Optional[ValueWithExpiration[StoredValue]]) -> bool:
                pending = remaining[key_id]
                pending.search.add_candidate(found, node_id)
                if pending.search.satisfied:
                    self._finish(pending)
                return pending.search.finished or pending.abandoned

            async def on_done(key_id: DHTID, nearest: List[DHTID], visited: Set[DHTID]) -> None:
                pending = remaining[key_id]
                self._finish(pending)
                self._cache_nearest(pending.search, nearest, visited, node_to_peer_id)

            node_to_peer_id: Dict[DHTID, PeerID] = {}
            beam_size = beam_size or self.protocol.bucket_size
            await self._beam_search(list(remaining), beam_size, num_workers, node_to_peer_id, on_find, on_done)
            for pending in remaining.values():
                self._finish(pending)
        except BaseException as e:
            for pending in searches.values():
                for future in pending.futures:
                    if future.done():
                        continue
                    if isinstance(e, Exception):  # the waiters get the error (a cancelled future would cancel them)
                        future.set_exception(e)
                        future.exception()  # a waiter that already left must not leave it "never retrieved"
                    else:
                        future.cancel()
                pending.search.finished = True
                pending_list = self._pending_gets.get(pending.search.key_id, [])
                if pending in pending_list:
                    pending_list.remove(pending)
                    if not pending_list:  # (as _finish does: a failed search must not leave its key behind)
                        del self._pending_gets[pending.search.key_id]
            raise

    def _cache_nearest(
        self, search: KeySearch, nearest: List[DHTID], visited: Set[DHTID], node_to_peer_id: Dict[DHTID, PeerID]
    ) -> None:
        """Push the found entry into the caches of the ``cache_nearest`` nearest visited nodes that lack it."""
        if search.best is None or self.cache_nearest <= 0:
            return
        targets = [
            node_id
            for node_id in sorted(visited, key=search.key_id.xor_distance)
            if node_id != self.node_id
            and node_id not in search.sources
            and node_id in node_to_peer_id
            and node_to_peer_id[node_id] not in self.blacklist  # visited also lists nodes that failed to answer
        ][: self.cache_nearest]
        for node_id in targets:
            self._spawn(
                self.protocol.call_store(
                    node_to_peer_id[node_id],
                    [search.key_id],
                    [search.best.value],
                    [search.best.expiration_time],
                    in_cache=True,
                )
            )

    def _schedule_cache_refresh(self, key_id: DHTID, expiration_time: DHTExpiration) -> None:
        if self.cache_refresh_before_expiry > 0 and key_id not in self.cache_refresh_queue:
            self.cache_refresh_queue.push(key_id, expiration_time)
            self._cache_refresh_wakeup.set()
