"""
Storing on a DHTNode: values go to the ``num_replicas`` nodes nearest to each key (found by a search, or taken from the
routing table when it likely knows the whole swarm and confirmed by a batched search afterwards).
"""

import asyncio
import math
import numbers
from collections import defaultdict
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID, DHTKey, DHTValue, Subkey
from hivemind.dht.storage import MAX_DICTIONARY_BYTES, DictionaryDHTValue
from hivemind.dht.store_fanout import KeyProgress, StoreFanout
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import DHTExpiration
from hivemind.utils.value_checks import is_number

logger = get_logger(__name__)

CONFIRM_REPLICAS_DELAY = 1.0  # s: stores sent to nodes from the routing table are confirmed by batched searches
CONFIRM_KEYS_PER_SEARCH = 1024  # keys of one confirming search: a search of many more holds up the event loop
StoreKey = Union[DHTKey, Tuple[DHTKey, Subkey]]  # a store_many result is keyed by key, or (key, subkey) for subkeys


class ReplicatedStore:
    """
    The store methods of :class:`~hivemind.dht.node.DHTNode` (a mixin: it uses the node's protocol, routing table,
    searches and task ownership).
    """

    # provided by DHTNode
    node_id: DHTID
    peer_id: PeerID
    protocol: DHTProtocol
    num_replicas: int
    cache_on_store: bool
    _unconfirmed_stores: List[Tuple[List[KeyProgress], bool]]  # (keys of one store_many, exclude_self)
    _store_confirmer: Optional[asyncio.Task]
    _spawn: Callable[[Awaitable], asyncio.Task]
    find_nearest_nodes: Callable[..., Awaitable[Dict[DHTID, Dict[DHTID, PeerID]]]]
    _offer_to_running_gets: Callable[[DHTID, Optional[Subkey], bytes, DHTExpiration], None]

    async def store(
        self,
        key: DHTKey,
        value: DHTValue,
        expiration_time: DHTExpiration,  # absolute DHT time, s
        subkey: Optional[Subkey] = None,
        **kwargs,
    ) -> bool:
        """Store one value (or one dictionary entry); returns whether the replicas accepted it."""
        result = await self.store_many([key], [value], [expiration_time], subkeys=[subkey], **kwargs)
        return result[(key, subkey) if subkey is not None else key]

    async def store_many(
        self,
        keys: List[DHTKey],
        values: List[DHTValue],
        expiration_time: Union[DHTExpiration, List[DHTExpiration]],  # one for all values, or one per value
        subkeys: Optional[Union[Subkey, List[Optional[Subkey]]]] = None,  # None: regular values
        exclude_self: bool = False,
        await_all_replicas: bool = True,
        **kwargs,
    ) -> Dict[StoreKey, bool]:
        """
        Store values on the ``num_replicas`` nearest nodes to each key (this node included unless ``exclude_self``).

        :param expiration_time: absolute DHT time (s) for all values, or one per value
        :param subkeys: None (regular values) or one subkey per value (None for a regular value)
        :param await_all_replicas: if False, a key's result is reported as soon as one replica accepts it; the
          remaining replicas are still written in the background
        :param kwargs: forwarded to find_nearest_nodes (beam_size, num_workers)
        :returns: {key: accepted} for regular values and {(key, subkey): accepted} for dictionary entries
        """
        if isinstance(expiration_time, (numbers.Real, str, bytes)) or expiration_time is None:  # (one for all)
            expiration_time = [expiration_time] * len(keys)
        if subkeys is None:
            subkeys = [None] * len(keys)
        if not len(keys) == len(values) == len(expiration_time) == len(subkeys):
            raise ValueError(
                f"keys, values, expiration_time and subkeys must have equal lengths, got "
                f"{len(keys)}, {len(values)}, {len(expiration_time)}, {len(subkeys)}"
            )

        for expiration in expiration_time:
            _check_expiration_time(expiration)
        if any(key is None for key in keys):  # it would hash to a random id: no get() could find the value
            raise TypeError("a DHT key cannot be None: store under a str, bytes or number that get() can use too")
        entries_by_key: Dict[DHTID, List[Tuple[StoreKey, Optional[Subkey], bytes, DHTExpiration]]] = defaultdict(list)
        for key, value, expiration, subkey in zip(keys, values, expiration_time, subkeys):
            key_id = DHTID.generate(source=key)
            value_bytes = self._sign(key_id, subkey, MSGPackSerializer.dumps(value), expiration)
            result_key = (key, subkey) if subkey is not None else key
            if subkey is not None:
                _warn_if_beyond_dictionary_limit(key, subkey, value_bytes)
            entries_by_key[key_id].append((result_key, subkey, value_bytes, expiration))

        loop = asyncio.get_running_loop()
        results = {key_id: loop.create_future() for key_id in entries_by_key}
        to_confirm = len(self.protocol.routing_table) < self.protocol.bucket_size
        if to_confirm:
            # the routing table most likely knows the whole swarm: store to the nearest known nodes right away and
            # confirm them with a search once the store is over, storing to any nearest node that has not answered
            candidates = {key_id: self._nearest_known(key_id, exclude_self) for key_id in entries_by_key}
        else:
            candidates = await self.find_nearest_nodes(
                list(entries_by_key), k_nearest=self.num_replicas, exclude_self=exclude_self, **kwargs
            )
        progress = [
            KeyProgress(key_id, entries, list(candidates[key_id].items()), self.num_replicas, results[key_id])
            for key_id, entries in entries_by_key.items()
        ]
        fanout = self._fanout(early_result=not await_all_replicas, cache_when_done=self.cache_on_store)
        task = self._spawn(fanout.run(progress))

        def on_fanout_done(task: asyncio.Task) -> None:
            for key in progress:  # a task cancelled before it started never reaches its own `finally`
                key.resolve()
            if to_confirm and not task.cancelled() and self.is_alive:
                # (after the store: a search of thousands of keys would hold up the event loop while it sends them)
                self._unconfirmed_stores.append((progress, exclude_self))
                if self._store_confirmer is None or self._store_confirmer.done():
                    self._store_confirmer = self._spawn(self._confirm_replicas())

        task.add_done_callback(on_fanout_done)
        store_ok: Dict[StoreKey, bool] = {}
        for key_id, entries in entries_by_key.items():
            for (result_key, *_), accepted in zip(entries, await results[key_id]):
                store_ok[result_key] = accepted
        return store_ok

    async def _confirm_replicas(self) -> None:
        """
        Batch by batch, search for the nearest nodes of recently stored keys and store each key to those of them that
        did not answer its store (nodes the local routing table did not offer, or that were silent then). Waiting
        CONFIRM_REPLICAS_DELAY first lets one search serve many stores. A batch whose search fails is logged and
        skipped: its keys keep the replicas they were first stored on.
        """
        while self._unconfirmed_stores:
            await asyncio.sleep(CONFIRM_REPLICAS_DELAY)
            batch, self._unconfirmed_stores = self._unconfirmed_stores, []
            for exclude_self in (False, True):
                keys = [key for progress, exclude in batch if exclude == exclude_self for key in progress]
                for start in range(0, len(keys), CONFIRM_KEYS_PER_SEARCH):
                    try:
                        await self._confirm_batch(keys[start : start + CONFIRM_KEYS_PER_SEARCH], exclude_self)
                    except Exception as e:
                        logger.warning(f"Could not confirm the replicas of {len(keys)} keys: {e!r}", exc_info=True)
                        break

    async def _confirm_batch(self, keys: List[KeyProgress], exclude_self: bool) -> None:
        key_ids = list({key.key_id: None for key in keys})
        nearest = await self.find_nearest_nodes(key_ids, k_nearest=self.num_replicas, exclude_self=exclude_self)
        progress = []
        for key in keys:
            if key.too_large:  # no peer could be sent it (and the store warned about it)
                continue
            missed = [(node, peer) for node, peer in nearest[key.key_id].items() if node not in key.answered]
            if missed:
                progress.append(KeyProgress(key.key_id, key.entries, missed, wanted=len(missed)))
        await self._fanout(early_result=False, cache_when_done=False).run(progress)

    def _nearest_known(self, key_id: DHTID, exclude_self: bool) -> Dict[DHTID, PeerID]:
        """Nodes of the local routing table (and this node, unless excluded) ordered by distance to key_id."""
        candidates = self.protocol.routing_table.get_nearest_neighbors(key_id, self.protocol.bucket_size)
        if not exclude_self and not self.protocol.client_mode:
            candidates.append((self.node_id, self.peer_id))
        candidates.sort(key=lambda item: key_id.xor_distance(item[0]))
        return dict(candidates)

    def _fanout(self, early_result: bool, cache_when_done: bool) -> StoreFanout:
        """Sends keys' entries to their candidates, many keys per request (see :mod:`hivemind.dht.store_fanout`)."""

        def send(peer_id: PeerID, key_ids: List[DHTID], entries: List[Any]) -> Awaitable[Optional[List[bool]]]:
            _, subkeys, values, expirations = zip(*entries)
            return self.protocol.call_store_if_it_fits(peer_id, key_ids, values, expirations, subkeys, None)

        def on_answer(key: KeyProgress, statuses: List[bool]) -> None:
            for (_, subkey, value, expiration), accepted in zip(key.entries, statuses):
                if accepted:  # before the caller learns of it: its next get may join a search started earlier
                    self._offer_to_running_gets(key.key_id, subkey, value, expiration)

        def on_done(key: KeyProgress) -> None:
            if cache_when_done:
                for (_, subkey, value, expiration), accepted in zip(key.entries, key.statuses):
                    if accepted:
                        self.protocol.cache.store(key.key_id, value, expiration, subkey=subkey)

        return StoreFanout(
            self.node_id,
            send,
            lambda key: self._store_locally(key.key_id, key.entries),
            on_answer,
            on_done,
            self.protocol.store_pacer,  # (shared with the hand-over of keys to newcomers)
            early_result=early_result,
        )

    def _sign(self, key_id: DHTID, subkey: Optional[Subkey], value: bytes, expiration: DHTExpiration) -> bytes:
        validator = self.protocol.record_validator
        if validator is None:
            return value
        subkey_bytes = DHTProtocol.IS_REGULAR_VALUE if subkey is None else MSGPackSerializer.dumps(subkey)
        return validator.sign_value(DHTRecord(key_id.to_bytes(), subkey_bytes, value, expiration))

    def _store_locally(
        self, key_id: DHTID, entries: Sequence[Tuple[Any, Optional[Subkey], bytes, float]]
    ) -> List[bool]:
        outcomes = []
        for _, subkey, value, expiration in entries:
            subkey_bytes = DHTProtocol.IS_REGULAR_VALUE if subkey is None else MSGPackSerializer.dumps(subkey)
            if self.protocol.check_record(DHTRecord(key_id.to_bytes(), subkey_bytes, value, expiration)) is not None:
                outcomes.append(False)
                continue
            # owned by this node: its own entries hold a fair share of a full dictionary (see dictionary_shares.py)
            outcomes.append(self.protocol.storage.store(key_id, value, expiration, subkey=subkey, owner=self.peer_id))
        return outcomes


def _warn_if_beyond_dictionary_limit(key: DHTKey, subkey: Subkey, value: bytes) -> None:
    """An entry larger than a whole dictionary may be is refused by every replica of ours: store() returns False."""
    nbytes = DictionaryDHTValue.entry_nbytes(subkey, value)
    if nbytes > MAX_DICTIONARY_BYTES:
        logger.warning(
            f"Storing key {_abridged(key)} subkey {_abridged(subkey)}: the entry takes {nbytes} bytes (subkey, value "
            f"and overhead), over the {MAX_DICTIONARY_BYTES} bytes a key's dictionary may hold in all "
            f"(MAX_DICTIONARY_BYTES in hivemind.dht.storage), so the replicas refuse it; store large data "
            f"elsewhere and its location in the DHT"
        )


def _abridged(obj: Any, limit: int = 60) -> str:
    text = repr(obj)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_expiration_time(expiration: Any) -> None:
    """A record whose expiration time is not a time was refused by every replica: store() returned a silent False."""
    if not is_number(expiration):
        raise TypeError(
            f"expiration_time must be an absolute DHT time in seconds, got {type(expiration).__name__}: "
            f"{expiration!r}; pass e.g. hivemind.utils.get_dht_time() + 60"
        )
    if math.isnan(expiration):
        raise ValueError(
            "expiration_time must be an absolute DHT time, got NaN; pass e.g. hivemind.utils.get_dht_time() + 60"
        )
