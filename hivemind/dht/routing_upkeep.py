"""
Routing-table upkeep of a DHT protocol: who may hold a node id, eviction of silent nodes, hand-over of stored keys to
newcomers, and the background tasks all of this starts (owned here, cancelled and awaited on shutdown).
"""

import asyncio
from typing import Coroutine, Dict, List, Optional, Set, Tuple

from hivemind.dht.replication import keys_to_replicate, replication_batches
from hivemind.dht.routing import DHTID, RoutingTable
from hivemind.dht.store_fanout import SendPacer
from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import ValueWithExpiration

logger = get_logger(__name__)

# newcomers waiting for the stored keys they should hold, one entry per peer; beyond this, a newcomer gets no keys
# now (it receives them when their owners store them again)
MAX_PENDING_REPLICATIONS = 256
# stored keys examined between two returns to the event loop while choosing what a newcomer should hold: the choice
# costs a routing-table lookup per stored key, so it must not hold the loop (and time out other calls) in one piece
REPLICATION_KEYS_PER_SLICE = 256
# keys for a newcomer are sent in store requests costing at most this much of its store rate limit each, paced with
# this node's other stores to it (SendPacer: within three quarters of the limit's default burst and rate)
REPLICATION_BATCH_COST = 4096
# ... and at most about this many bytes each: a unary request above the message limit of the daemon (4 MiB by default)
# fails, and the newcomer that did not accept it would be dropped from the routing table
REPLICATION_BATCH_BYTES = 1024 * 1024


def log_if_failed(task: asyncio.Task) -> None:
    """Done-callback of an owned background task: its error, if any, is logged instead of left unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        logger.warning(f"Background task {task.get_name()} failed: {task.exception()!r}", exc_info=task.exception())


class RoutingUpkeep:
    """
    Mixin of :class:`~hivemind.dht.protocol.DHTProtocol`; the host provides ``routing_table``, ``storage``,
    ``client_mode``, ``node_id``, ``num_replicas``, ``call_ping`` and ``call_store``, and calls
    :meth:`_init_routing_upkeep` before serving.

    Any peer can claim any node id in its requests and answers. A claim of an id that the table already maps to
    another peer (as an active or a replacement node) is therefore not taken at its word: the current holder is
    pinged first, and keeps the id if it answers with it (Kademlia's rule: a live, known contact is never replaced
    by a newcomer). Only if the holder is silent, or now answers with another id, does the claimant take the id.
    However many claims of one id arrive, at most one such check per id is pending; claims arriving meanwhile are
    dropped (the claimant can try again later).

    The keys a newcomer should hold are chosen by one background task at a time, newcomer after newcomer, returning
    to the event loop every REPLICATION_KEYS_PER_SLICE stored keys; a peer that introduces itself under many ids in a
    row is served once, under the id it holds by then.
    """

    routing_table: RoutingTable

    def _init_routing_upkeep(self) -> None:
        self._background_tasks: Set[asyncio.Task] = set()
        self._id_claim_checks: Dict[DHTID, asyncio.Task] = {}  # claimed node id -> the pending ping of its holder
        self._upkeep_closed = False
        self._pending_replications: Dict[PeerID, DHTID] = {}  # newcomer peer -> its node id, first come first served
        self._replicator: Optional[asyncio.Task] = None
        # what this node's store requests spent of each peer's store rate limit: the hand-over to newcomers and the
        # node's stores (DHTNode.store_many) share it, since a replica of ours counts them together
        self.store_pacer = SendPacer()

    def _spawn(self, coro: Coroutine) -> Optional[asyncio.Task]:
        """Run coro in the background, owned by this protocol; after shutdown started, coro is dropped unrun."""
        if self._upkeep_closed:
            coro.close()
            return None
        task = asyncio.create_task(coro)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)
        task.add_done_callback(log_if_failed)
        return task

    async def _stop_background_tasks(self) -> None:
        """Refuse new background work, then cancel every background task and wait until each has ended."""
        self._upkeep_closed = True
        tasks = list(self._background_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def update_routing_table(self, node_id: Optional[DHTID], peer_id: PeerID, responded: bool = True) -> None:
        """
        Record the outcome of an exchange with a peer. A peer that answered is added (or refreshed); when it is new,
        the keys it should hold are pushed to it in the background; when its bucket is full, the stalest node of that
        bucket is pinged and evicted if silent. A peer that did not answer is removed (a replacement takes its slot).
        A peer that claims an id held by another peer gets it only after the holder failed a ping (see the class).
        """
        if node_id is None:
            return
        if not responded:
            if node_id in self.routing_table:
                del self.routing_table[node_id]
            return
        holder = self.routing_table.holder_of(node_id)
        if holder is not None and holder != peer_id:
            self._check_id_claim(node_id, holder, peer_id)
            return
        is_new = node_id not in self.routing_table
        if is_new and not self.client_mode and len(self.storage) > 0:
            self._schedule_replication(node_id, peer_id)
        stale = self.routing_table.add_or_update_node(node_id, peer_id)
        if stale is not None:
            self._spawn(self._evict_if_silent(*stale))

    def _check_id_claim(self, node_id: DHTID, holder: PeerID, claimant: PeerID) -> None:
        if node_id in self._id_claim_checks:
            return  # one check per id at a time: concurrent claims cannot multiply the pings
        task = self._spawn(self._ping_holder_of_claimed_id(node_id, holder, claimant))
        if task is not None:
            self._id_claim_checks[node_id] = task
            task.add_done_callback(lambda _: self._id_claim_checks.pop(node_id, None))

    async def _ping_holder_of_claimed_id(self, node_id: DHTID, holder: PeerID, claimant: PeerID) -> None:
        if await self.call_ping(holder) == node_id:  # bounded by the protocol's wait_timeout
            logger.debug(f"{claimant} claimed node id {node_id!r}, but its holder {holder} answered: claim refused")
            return
        if self.routing_table.holder_of(node_id) == holder:  # silent, or a client, or it moved to another id
            del self.routing_table[node_id]
        if self.routing_table.holder_of(node_id) is None:
            logger.debug(f"{claimant} takes node id {node_id!r} from {holder}, which did not answer with it")
            await self.update_routing_table(node_id, claimant, responded=True)

    async def _evict_if_silent(self, node_id: DHTID, peer_id: PeerID) -> None:
        if await self.call_ping(peer_id) != node_id and self.routing_table.get(node_id=node_id) == peer_id:
            del self.routing_table[node_id]

    def _schedule_replication(self, node_id: DHTID, peer_id: PeerID) -> None:
        if peer_id not in self._pending_replications and len(self._pending_replications) >= MAX_PENDING_REPLICATIONS:
            logger.debug(f"{MAX_PENDING_REPLICATIONS} newcomers already wait for their keys; {peer_id} gets none now")
            return
        self._pending_replications[peer_id] = node_id
        if self._replicator is None or self._replicator.done():
            self._replicator = self._spawn(self._replicate_to_newcomers())

    async def _replicate_to_newcomers(self) -> None:
        while self._pending_replications:
            peer_id = next(iter(self._pending_replications))
            node_id = self._pending_replications.pop(peer_id)
            if self.routing_table.holder_of(node_id) != peer_id:
                continue  # it left the table or moved to another id meanwhile
            try:
                selected = await self._select_keys_for(node_id)
            except Exception as e:
                logger.warning(f"Could not choose the keys that {peer_id} should hold: {e!r}", exc_info=True)
                continue
            if selected:
                self._spawn(self._send_replicas(peer_id, selected))

    async def _send_replicas(self, peer_id: PeerID, selected: List[Tuple[DHTID, ValueWithExpiration]]) -> None:
        """
        Hand the selected keys to a newcomer in batches, one at a time, no faster than its store rate limit refills
        (paced by ``store_pacer`` together with this node's other stores to it): sent as one request, more keys than
        the limit's burst were refused whole.
        """
        for batch, cost in replication_batches(selected, REPLICATION_BATCH_COST, REPLICATION_BATCH_BYTES):
            await self.store_pacer.wait(peer_id, cost)
            keys = [key_id for key_id, _ in batch]
            values = [item.value for _, item in batch]
            expirations = [item.expiration_time for _, item in batch]
            if await self.call_store(peer_id, keys, values, expirations) is None:
                return  # the newcomer did not answer (it is no longer in the table): the rest would fail as well

    async def _select_keys_for(self, new_node_id: DHTID) -> List[Tuple[DHTID, ValueWithExpiration]]:
        """The stored (key, entry) pairs that the node ``new_node_id`` should hold, see keys_to_replicate."""

        def nearest_other_nodes(key_id: DHTID) -> List[DHTID]:
            neighbors = self.routing_table.get_nearest_neighbors(key_id, self.num_replicas, new_node_id)
            return [node_id for node_id, _ in neighbors]

        key_ids = list(self.storage.data)  # keys only: copying every (key, entry) pair would cost a GC pass
        selected = []
        for start in range(0, len(key_ids), REPLICATION_KEYS_PER_SLICE):
            if start > 0:
                await asyncio.sleep(0)
            chunk = key_ids[start : start + REPLICATION_KEYS_PER_SLICE]
            for key_id in keys_to_replicate(chunk, new_node_id, self.node_id, nearest_other_nodes):
                item = self.storage.get(key_id)  # None if it expired or was deleted meanwhile
                if item is not None:
                    selected.append((key_id, item))
        return selected
