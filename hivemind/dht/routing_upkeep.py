"""
Routing-table upkeep of a DHT protocol: who may hold a node id, eviction of silent nodes, hand-over of stored keys to
newcomers, and the background tasks all of this starts (owned here, cancelled and awaited on shutdown).
"""

import asyncio
from typing import Coroutine, Dict, Optional, Set

from hivemind.dht.replication import keys_to_replicate
from hivemind.dht.routing import DHTID, RoutingTable
from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)


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
    """

    routing_table: RoutingTable

    def _init_routing_upkeep(self) -> None:
        self._background_tasks: Set[asyncio.Task] = set()
        self._id_claim_checks: Dict[DHTID, asyncio.Task] = {}  # claimed node id -> the pending ping of its holder
        self._upkeep_closed = False

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
            self._spawn(self._replicate_to(node_id, peer_id))
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

    async def _replicate_to(self, new_node_id: DHTID, peer_id: PeerID) -> None:
        stored = {key_id: item for key_id, item in self.storage.items()}
        selected = keys_to_replicate(
            stored.keys(),
            new_node_id,
            self.node_id,
            lambda key_id: [
                node_id
                for node_id, _ in self.routing_table.get_nearest_neighbors(key_id, self.num_replicas, new_node_id)
            ],
        )
        if selected:
            values = [stored[key_id].value for key_id in selected]
            expirations = [stored[key_id].expiration_time for key_id in selected]
            await self.call_store(peer_id, selected, values, expirations)
