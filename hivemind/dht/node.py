"""DHTNode: a Kademlia peer on asyncio (creation, bootstrap, node lookups, shutdown; get, store, loops: node_*.py)."""

import asyncio
import math
import os
from collections import defaultdict
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, List, Optional, Sequence, Set, Tuple, Union

from multiaddr import Multiaddr

from hivemind.dht.blacklist import Blacklist
from hivemind.dht.node_get import PendingGet, SearchingGet
from hivemind.dht.node_store import ReplicatedStore
from hivemind.dht.node_upkeep import refresh_cache_forever, refresh_stale_buckets_forever
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.routing_upkeep import log_if_failed
from hivemind.dht.storage import CacheRefreshQueue
from hivemind.dht.traverse import traverse_dht
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils.logging import get_logger
from hivemind.utils.multiaddr import peer_id_of
from hivemind.utils.value_checks import is_count, is_number

if TYPE_CHECKING:
    from hivemind.utils.auth import AuthorizerBase

logger = get_logger(__name__)


def _num_workers_from_environment(default: int = 4) -> int:
    value = os.getenv("HIVEMIND_DHT_NUM_WORKERS", str(default))
    try:
        num_workers = int(value)
    except ValueError:
        num_workers = 0
    if num_workers < 1:
        raise ValueError(
            f"HIVEMIND_DHT_NUM_WORKERS={value!r} is not a positive integer (the default number of concurrent requests "
            f"of a DHT search, {default} when unset); set it to e.g. {default} or unset it"
        )
    return num_workers


DEFAULT_NUM_WORKERS = _num_workers_from_environment()
BOOTSTRAP_FAILED_MESSAGE = (
    "DHTNode bootstrap failed: none of the initial_peers responded to a ping. "
    "(set ensure_bootstrap_success=False to ignore)"
)
# a client-mode peer serves no DHT requests, so without initial peers it never learns of another peer
LONE_CLIENT_MESSAGE = (
    "client_mode=True without initial_peers: this peer answers no other peer and knows none, so it stays alone: "
    "store returns False (a client-mode peer keeps no records of its own) and get finds nothing. Pass "
    "initial_peers=[...] with the address of a running peer; a client-mode peer cannot be the first of a swarm"
)

MaddrLike = Union[Multiaddr, str]


def peer_id_from_maddr(maddr: Union[str, Multiaddr]) -> PeerID:
    """The peer id at the end of a multiaddr (ValueError if it has no /p2p/ part: peers are pinged by id)."""
    try:
        parsed = Multiaddr(str(maddr))
    except Exception as e:  # e.g. a port that is not a number, or host:port instead of a multiaddr
        raise ValueError(
            f"initial peer {maddr} is not a valid multiaddr ({e}); it should look like "
            f"/ip4/203.0.113.5/tcp/31337/p2p/<peer id>, as printed by the peer to join"
        ) from e
    peer_id = peer_id_of(parsed)  # the last /p2p/ part: in /p2p/<relay>/p2p-circuit/p2p/<peer> the first is the relay
    if peer_id is None:
        after_relay = " after /p2p-circuit (the /p2p/ before it names the relay)" if "p2p-circuit" in parsed else ""
        raise ValueError(
            f"initial peer {maddr} must end with /p2p/<peer id>{after_relay}: peers are joined by id; pass an "
            f"address of the peer to join as its get_visible_maddrs() (or hivemind-dht's start-up lines) shows it"
        )
    try:
        return PeerID.from_base58(peer_id)
    except Exception as e:
        raise ValueError(f"initial peer {maddr} must end with /p2p/<peer id> (got error: {e!r})") from e


def peer_ids_to_ping(maddr: str) -> List[PeerID]:
    """The peers to ping for one initial peer: its own, and for a relay address (/p2p/<relay>/p2p-circuit/p2p/<peer>)
    also the relay's, which hivemind 1.1.12 pinged (either may serve no DHT: a plain relay, a client-mode peer)."""
    peer_ids = [peer_id_from_maddr(maddr)]
    parts = list(Multiaddr(maddr).items())
    circuits = [index for index, (protocol, _) in enumerate(parts) if protocol.name == "p2p-circuit"]
    if circuits and circuits[-1] > 0 and parts[circuits[-1] - 1][0].name == "p2p":
        peer_ids.append(PeerID.from_base58(parts[circuits[-1] - 1][1]))
    return peer_ids


class DHTNode(SearchingGet, ReplicatedStore):
    """
    A DHT peer on an asyncio event loop: routing table, storage and cache live in its :class:`DHTProtocol`; this
    class finds nodes (beam search), stores to the ``num_replicas`` nearest nodes and gets values from them.
    Create with ``await DHTNode.create(...)``.
    """

    node_id: DHTID
    peer_id: PeerID
    p2p: P2P
    protocol: DHTProtocol
    is_alive: bool = False

    @classmethod
    async def create(
        cls,
        p2p: Optional[P2P] = None,  # None: start a daemon of our own with P2P.create(**kwargs)
        node_id: Optional[DHTID] = None,
        initial_peers: Optional[Sequence[MaddrLike]] = None,
        bucket_size: int = 20,  # Kademlia k
        num_replicas: int = 5,
        depth_modulo: int = 5,  # Kademlia b
        parallel_rpc: Optional[int] = None,
        wait_timeout: float = 3,  # s, per RPC
        refresh_timeout: Optional[float] = None,
        bootstrap_timeout: Optional[float] = None,
        cache_locally: bool = True,  # keep values found by get
        cache_nearest: int = 1,
        cache_size: Optional[int] = None,
        cache_refresh_before_expiry: float = 5,  # s
        cache_on_store: bool = True,
        reuse_get_requests: bool = True,
        num_workers: int = DEFAULT_NUM_WORKERS,  # concurrent RPCs of one search
        chunk_size: int = 16,
        blacklist_time: float = 5.0,  # s
        backoff_rate: float = 2.0,
        client_mode: bool = False,
        record_validator: Optional[RecordValidatorBase] = None,
        authorizer: Optional["AuthorizerBase"] = None,
        ensure_bootstrap_success: bool = True,
        strict: bool = True,
        **kwargs,
    ) -> "DHTNode":
        """
        Start a node and join the DHT through ``initial_peers``.

        :param kwargs: options for P2P.create when ``p2p`` is None (ValueError if ``p2p`` is given)
        :raises ValueError: ``num_workers`` or ``num_replicas`` below 1, ``parallel_rpc`` not above 0, ``wait_timeout``
            not above 0 (a fraction of ``parallel_rpc`` is rounded up)
        :raises RuntimeError: no initial peer answered and ``ensure_bootstrap_success`` is set
        :raises ValidationError: with ``strict``, an initial peer cannot reach us or its clock differs by > 3 s
        """
        if not is_count(num_workers):
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if wait_timeout is not None and not wait_timeout > 0:  # 0 or less: every request would time out at once
            raise ValueError(f"wait_timeout must be a positive number of seconds, got {wait_timeout!r}")
        if not is_count(num_replicas):  # (below 1, no store works)
            raise ValueError(f"num_replicas must be a positive integer (nodes storing each key), got {num_replicas!r}")
        # 0: the bootstrap ping would wait forever; a fraction (which hivemind 1.1.12 takes: 0.5 runs one request at a
        # time) is rounded up
        if parallel_rpc is not None and not (is_number(parallel_rpc) and 0 < parallel_rpc < math.inf):
            raise ValueError(f"parallel_rpc must be None (no limit) or a positive number, got {parallel_rpc!r}")
        # (numpy integers, as hivemind 1.1.12 accepts, become plain ints)
        num_workers, num_replicas = int(num_workers), int(num_replicas)
        parallel_rpc = None if parallel_rpc is None else math.ceil(parallel_rpc)
        self = cls(_created_by_create=True)
        initial_peers = [] if initial_peers is None else [str(maddr) for maddr in initial_peers]
        initial_peer_ids = list(dict.fromkeys(peer for maddr in initial_peers for peer in peer_ids_to_ping(maddr)))

        self._owns_p2p = p2p is None
        if p2p is None:
            kwargs.setdefault("dht_mode", "client" if client_mode else "server")
            # with use_ipfs the daemon finds peers through the IPFS DHT and refuses explicit bootstrap peers
            daemon_bootstrap_peers = None if kwargs.get("use_ipfs") else initial_peers or None
            p2p = await P2P.create(initial_peers=daemon_bootstrap_peers, **kwargs)
        elif kwargs:
            raise ValueError(f"DHTNode.create got P2P options {sorted(kwargs)} together with an existing p2p")
        self.p2p, self.peer_id = p2p, p2p.peer_id
        self.node_id = DHTID.generate() if node_id is None else node_id

        self.num_replicas, self.num_workers = num_replicas, num_workers
        self.chunk_size, self.reuse_get_requests = chunk_size, reuse_get_requests
        self.cache_locally, self.cache_on_store = cache_locally, cache_on_store
        self.cache_nearest, self.cache_refresh_before_expiry = cache_nearest, cache_refresh_before_expiry
        self.refresh_timeout = refresh_timeout
        self.blacklist: Blacklist[PeerID] = Blacklist(blacklist_time, backoff_rate)
        self.cache_refresh_queue = CacheRefreshQueue(cache_refresh_before_expiry)
        self._cache_refresh_wakeup = asyncio.Event()
        self._pending_gets: Dict[DHTID, List[PendingGet]] = defaultdict(list)
        self._tasks: Set[asyncio.Task] = set()
        self._unconfirmed_stores: List[Tuple[List[Any], bool]] = []  # (KeyProgress of one store_many, exclude_self)
        self._store_confirmer: Optional[asyncio.Task] = None

        try:
            self.protocol = await DHTProtocol.create(
                self.p2p,
                self.node_id,
                bucket_size=bucket_size,
                depth_modulo=depth_modulo,
                num_replicas=num_replicas,
                wait_timeout=wait_timeout,
                parallel_rpc=parallel_rpc,
                cache_size=cache_size,
                client_mode=client_mode,
                record_validator=record_validator,
                authorizer=authorizer,
            )
            self.is_alive = True
            if client_mode and not initial_peer_ids and not kwargs.get("use_ipfs"):
                logger.warning(LONE_CLIENT_MESSAGE)
            if initial_peer_ids:
                extra_wait = wait_timeout if bootstrap_timeout is None else bootstrap_timeout
                await self._bootstrap(initial_peer_ids, extra_wait, ensure_bootstrap_success, strict)
        except BaseException:
            await self.shutdown()
            raise
        if cache_refresh_before_expiry > 0 and cache_locally:
            self._spawn(refresh_cache_forever(self))
        if refresh_timeout is not None:
            self._spawn(refresh_stale_buckets_forever(self, refresh_timeout))
        return self

    def __init__(self, *, _created_by_create: bool = False):
        assert _created_by_create, "create DHTNode with `await DHTNode.create(...)`"

    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        """Run coro as a task owned by this node: shutdown cancels and awaits it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_if_failed)
        return task

    async def _bootstrap(
        self, peer_ids: List[PeerID], bootstrap_timeout: float, ensure_success: bool, strict: bool
    ) -> None:
        """Ping the initial peers (asking them to validate us), then look ourselves up to fill the routing table."""
        validate = ensure_success and not self.protocol.client_mode
        pings = [asyncio.create_task(self.protocol.call_ping(peer, validate, strict)) for peer in peer_ids]
        try:
            pending = set(pings)
            while pending:  # wait for the first peer that answers
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(task.result() is not None for task in done):  # .result() re-raises ValidationError
                    break
            if pending:  # give slower peers a little more time to answer
                done, pending = await asyncio.wait(pending, timeout=bootstrap_timeout)
                for task in done:
                    task.result()
        finally:
            for task in pings:
                task.cancel()
            await asyncio.gather(*pings, return_exceptions=True)

        if len(self.protocol.routing_table) == 0:
            if ensure_success:
                raise RuntimeError(BOOTSTRAP_FAILED_MESSAGE)
            logger.warning(BOOTSTRAP_FAILED_MESSAGE)
            return
        await self.find_nearest_nodes([self.node_id])

    async def shutdown(self) -> None:
        """Cancel and await all background work, stop serving RPCs, stop the P2P daemon if this node started it."""
        self.is_alive = False
        while self._tasks:  # a task may start others while it is being cancelled: repeat until none is left
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
        for pending_list in self._pending_gets.values():
            for pending in pending_list:
                for future in pending.futures:
                    if not future.done():
                        future.cancel()
        if hasattr(self, "protocol"):
            await self.protocol.shutdown()
        if getattr(self, "_owns_p2p", False):  # also after p2pd died: its callback socket is still to be removed
            await self.p2p.shutdown()

    async def get_visible_maddrs(
        self,
        latest: bool = False,  # ask the daemon again instead of using the addresses it reported before
    ) -> List[Multiaddr]:
        return await self.p2p.get_visible_maddrs(latest=latest)

    @property
    def blacklist_time(self) -> float:
        return self.blacklist.base_time

    # ------------------------------------------------------------------ finding nodes

    async def _find_with_backoff(self, peer: PeerID, keys: Collection[DHTID]):
        """call_find that skips blacklisted peers and blacklists peers that do not answer."""
        if peer in self.blacklist:
            return None
        response = await self.protocol.call_find(peer, keys)
        if response is None:
            self.blacklist.register_failure(peer)
        else:
            self.blacklist.register_success(peer)
        return response

    async def _beam_search(
        self,
        queries: Collection[DHTID],
        beam_size: int,
        num_workers: int,
        node_to_peer_id: Dict[DHTID, PeerID],
        on_find: Optional[Callable[[DHTID, DHTID, Any], bool]] = None,
        on_done: Optional[Callable[[DHTID, List[DHTID], Set[DHTID]], Awaitable[None]]] = None,
    ) -> Tuple[Dict[DHTID, List[DHTID]], Dict[DHTID, Set[DHTID]]]:
        """
        Visit the nodes nearest to each query with batched find calls; ``on_find(query, node_id, found_value)``
        returns True to stop that query's search, ``on_done(query, nearest, visited)`` runs when a query finishes.
        Returns (nearest node ids, visited node ids) per query.
        """
        queries = list(queries)
        initial_nodes: Dict[DHTID, None] = {}
        for query in queries:
            for node_id, peer_id in self.protocol.routing_table.get_nearest_neighbors(query, beam_size):
                initial_nodes[node_id] = None
                node_to_peer_id.setdefault(node_id, peer_id)

        # each peer is asked under one node id per search: a peer whose answers name ever nearer made-up node ids at
        # itself would otherwise be asked again under each of them, and the search would never end
        asked_as: Dict[PeerID, DHTID] = {self.peer_id: self.node_id}

        async def get_neighbors(node_id: DHTID, node_queries: Collection[DHTID]):
            peer = node_to_peer_id.get(node_id)
            if peer is None or asked_as.setdefault(peer, node_id) != node_id:
                return {}  # a failure of that node id, without a request
            response = await self._find_with_backoff(peer, node_queries)
            if response is None:
                return {}
            output = {}
            known_peer = self.protocol.routing_table.get
            for query, (maybe_value, nearest) in response.items():
                for neighbor_id, neighbor_peer in nearest.items():
                    # a node we know is reached at its known peer, whatever peer another node's answer names
                    node_to_peer_id.setdefault(neighbor_id, known_peer(node_id=neighbor_id, default=neighbor_peer))
                should_stop = on_find(query, node_id, maybe_value) if on_find is not None else False
                neighbors = [neighbor for neighbor in nearest if neighbor != self.node_id]
                output[query] = (neighbors, should_stop)
            return output

        queries_per_call = max(1, min(int(len(queries) ** 0.5), self.chunk_size))
        return await traverse_dht(
            queries,
            list(initial_nodes),
            beam_size,
            num_workers,
            queries_per_call,
            get_neighbors,
            visited_nodes=dict.fromkeys(queries, (self.node_id,)),  # never ask ourselves
            found_callback=on_done,
            await_all_tasks=False,
            spawn=self._spawn,  # found_callbacks still running when the search ends belong to this node
        )

    async def find_nearest_nodes(
        self,
        queries: Collection[DHTID],
        k_nearest: Optional[int] = None,  # default: bucket_size
        beam_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        node_to_peer_id: Optional[Dict[DHTID, PeerID]] = None,  # filled with every node id -> peer id learned
        exclude_self: bool = False,
        **kwargs,
    ) -> Dict[DHTID, Dict[DHTID, PeerID]]:
        """
        For each query id, the ``k_nearest`` (default bucket_size) nodes nearest to it that answered, nearest first,
        as {node_id: peer_id}. This node counts among them unless ``exclude_self`` (or it is a client).
        """
        queries = list(queries)
        if k_nearest is None:
            k_nearest = self.protocol.bucket_size
        beam_size = k_nearest if beam_size is None else max(beam_size, k_nearest)
        num_workers = num_workers or self.num_workers
        if node_to_peer_id is None:
            node_to_peer_id = {}
        include_self = not exclude_self and not self.protocol.client_mode

        nearest_nodes, _ = await self._beam_search(queries, beam_size, num_workers, node_to_peer_id)
        output = {}
        for query in queries:
            candidates = [node for node in nearest_nodes.get(query, []) if node != self.node_id]
            if include_self:
                candidates.append(self.node_id)
            candidates.sort(key=query.xor_distance)
            output[query] = {
                node: self.peer_id if node == self.node_id else node_to_peer_id[node]
                for node in candidates[:k_nearest]
            }
        return output
