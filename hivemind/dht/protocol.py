"""The DHT's three RPCs (ping, store, find): the servicer that answers them and the client calls."""

import asyncio
import collections
from typing import TYPE_CHECKING, Collection, Dict, List, Optional, Sequence, Tuple, Union

from hivemind.dht.id_codec import IdCodec
from hivemind.dht.protocol_store import StoreHandling
from hivemind.dht.protocol_stub import NodeStubGetter
from hivemind.dht.rate_limit import (
    DICTIONARY_LOAN_ITEMS,
    MAX_BORROWING_REQUEST_ITEMS,
    STORE_BYTES_PER_ITEM,
    PeerRateLimiter,
    store_item_cost,
)
from hivemind.dht.request_checks import (
    IS_DICTIONARY,
    IS_REGULAR_VALUE,
    MAX_FIND_RESPONSE_VALUE_BYTES,
    RequestRejected,
    check_dictionary_entry,
    check_find_request_shape,
    check_find_result_shape,
    check_node_id_bytes,
    check_store_request_shape,
    check_value_bytes,
    dictionary_layout,
)
from hivemind.dht.routing import DHTID, BinaryDHTValue, RoutingTable, Subkey
from hivemind.dht.routing_upkeep import RoutingUpkeep
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.utils import RequestTooLargeError
from hivemind.proto import dht_pb2
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import (
    MAX_DHT_TIME_DISCREPANCY_SECONDS,
    DHTExpiration,
    ValueWithExpiration,
    get_dht_time,
)

if TYPE_CHECKING:
    from hivemind.utils.auth import AuthorizerBase

logger = get_logger(__name__)

StoredValue = Union[BinaryDHTValue, DictionaryDHTValue]
FindResult = Tuple[Optional[ValueWithExpiration[StoredValue]], Dict[DHTID, PeerID]]


class ValidationError(Exception):
    """A peer we bootstrap from says it cannot reach us back, or its clock differs from ours by too much."""


class DHTProtocol(RoutingUpkeep, StoreHandling, ServicerBase):
    """
    Serves ``DHTProtocol.rpc_ping/rpc_store/rpc_find`` from this node's storage, cache and routing table, and calls
    them on other peers. Every remote request is checked (:mod:`hivemind.dht.request_checks`) before it touches
    storage; rejected input is counted per reason in :attr:`rejected`. Create with ``await DHTProtocol.create(...)``.
    A client-mode protocol registers no handlers and introduces itself with an empty node id.
    """

    serializer = MSGPackSerializer
    IS_REGULAR_VALUE = IS_REGULAR_VALUE
    IS_DICTIONARY = IS_DICTIONARY
    RESERVED_SUBKEYS = (IS_REGULAR_VALUE, IS_DICTIONARY)  # no user subkey encodes to these (see request_checks)
    get_stub = NodeStubGetter()  # DHTProtocol.get_stub(p2p, peer) and protocol.get_stub(peer)

    p2p: P2P
    node_id: DHTID
    routing_table: RoutingTable
    storage: DHTLocalStorage
    cache: DHTLocalStorage

    @classmethod
    async def create(
        cls,
        p2p: P2P,
        node_id: DHTID,
        bucket_size: int,  # Kademlia k: nodes per bucket, neighbours per find answer
        depth_modulo: int,
        num_replicas: int,
        wait_timeout: float,  # s, per RPC
        parallel_rpc: Optional[int] = None,
        cache_size: Optional[int] = None,
        client_mode: bool = False,
        record_validator: Optional[RecordValidatorBase] = None,
        authorizer: Optional["AuthorizerBase"] = None,
    ) -> "DHTProtocol":
        self = cls()
        self.p2p, self.node_id, self.client_mode = p2p, node_id, client_mode
        self.bucket_size, self.num_replicas, self.wait_timeout = bucket_size, num_replicas, wait_timeout
        self.routing_table = RoutingTable(node_id, bucket_size=bucket_size, depth_modulo=depth_modulo)
        self.storage = DHTLocalStorage()
        self.cache = DHTLocalStorage(maxsize=cache_size)  # values cached by get and by other peers (in_cache)
        self.record_validator, self.authorizer = record_validator, authorizer
        self.rpc_semaphore = asyncio.Semaphore(parallel_rpc) if parallel_rpc is not None else None
        self.rejected: collections.Counter = collections.Counter()  # reason -> how many remote inputs were rejected
        self._init_routing_upkeep()  # background tasks and id-claim checks, see RoutingUpkeep
        self._codec = IdCodec()
        self.store_rate_limiter = PeerRateLimiter()  # caps store items per remote peer (flood protection)
        self.node_info = dht_pb2.NodeInfo() if client_mode else dht_pb2.NodeInfo(node_id=node_id.to_bytes())
        if not client_mode:
            wrapper = None
            if authorizer is not None:
                from hivemind.utils.auth import AuthRole, AuthRPCWrapper

                wrapper = AuthRPCWrapper(self, AuthRole.SERVICER, authorizer)
            await self.add_p2p_handlers(self.p2p, wrapper)
        return self

    def __init__(self):
        pass  # use DHTProtocol.create: the servicer needs a running event loop and a P2P to register with

    async def shutdown(self) -> None:
        """Stop answering RPCs (if serving), then cancel background work (replication, pings) and await its end."""
        if not self.client_mode and self.p2p.is_alive:
            try:
                await self.remove_p2p_handlers(self.p2p)
            except Exception as e:
                logger.debug(f"Could not remove DHT handlers: {e!r}")
        await self._stop_background_tasks()

    def _reject(self, reason: str) -> bool:  # counts a rejected input; returns False, what a refused store returns
        self.rejected[reason] += 1
        return False

    def _stub(self, peer: PeerID):
        return self.get_stub(peer)  # signs requests with self.authorizer, if any

    # ------------------------------------------------------------------ server side: answering remote peers

    def _check_sender(self, node_info: dht_pb2.NodeInfo) -> Optional[DHTID]:
        """The sender's node id, or None for a client-mode sender; a malformed id rejects the request."""
        try:
            check_node_id_bytes(node_info.node_id)
        except RequestRejected as e:
            self._reject(e.reason)
            raise
        return DHTID.from_bytes(node_info.node_id) if node_info.node_id else None

    async def rpc_ping(
        self,
        request: dht_pb2.PingRequest,
        context: P2PContext,
    ) -> dht_pb2.PingResponse:
        """Answer with our node id and time; with ``validate``, first check that we can reach the caller back."""
        sender_id = self._check_sender(request.peer)
        response = dht_pb2.PingResponse(peer=self.node_info, dht_time=get_dht_time())
        if sender_id is not None:
            if request.validate:
                response.available = await self.call_ping(context.remote_id, validate=False) == sender_id
            if response.available or not request.validate:
                await self.update_routing_table(sender_id, context.remote_id, responded=True)
        return response

    async def rpc_store(
        self,
        request: dht_pb2.StoreRequest,
        context: P2PContext,
    ) -> dht_pb2.StoreResponse:
        """Store (or cache) each item that is well-formed, valid and newer than what we hold."""
        sender_id = self._check_sender(request.peer)
        try:
            check_store_request_shape(
                keys=request.keys,
                subkeys=request.subkeys,
                values=request.values,
                expirations=request.expiration_time,
                in_cache=request.in_cache,
            )
        except RequestRejected as e:
            self._reject(e.reason)
            raise
        limiter, peer = self.store_rate_limiter, context.remote_id
        # a large value or two, not a flood of items; nor a cache push (a getter's best effort, which would leave the
        # getter in debt here, its own stores to this node refused for up to 30 s)
        may_borrow = len(request.keys) <= MAX_BORROWING_REQUEST_ITEMS and not any(request.in_cache)
        # what the request costs at least (weighing it takes up to ~40 ms per 4 MiB): refused unweighed if beyond
        least = (
            len(request.keys)
            + sum(
                len(subkey) + (len(value) if subkey != IS_DICTIONARY else 0)
                for subkey, value in zip(request.subkeys, request.values)
            )
            / STORE_BYTES_PER_ITEM
        )
        cost = None
        if limiter.fits(peer, least, may_borrow):
            cost = sum(  # bytes weighed by what decoding them costs: 4 MiB of nested tuples took seconds
                store_item_cost(subkey, value, subkey == IS_DICTIONARY)
                for subkey, value in zip(request.subkeys, request.values)
            )
        in_loan = cost is not None and not limiter.fits(peer, cost)  # admitted only by borrowing, if at all
        if cost is None or not limiter.allow(peer, cost, may_borrow):
            if cost is not None:  # it was weighed, and weighing a refused request is not free
                limiter.spend_at_most(peer, least)
            self.rejected["rate_limited"] += len(request.keys)
            return dht_pb2.StoreResponse(store_ok=[False] * len(request.keys), peer=self.node_info)
        loan_floor = limiter.tokens(peer) - DICTIONARY_LOAN_ITEMS if in_loan else None  # for its whole dictionaries
        if sender_id is not None:
            await self.update_routing_table(sender_id, context.remote_id, responded=True)
        now = get_dht_time()
        in_cache = request.in_cache or [False] * len(request.keys)
        store_ok = [
            self._store_item(key, subkey, value, expiration_time, cache, now, context.remote_id, loan_floor)
            for key, subkey, value, expiration_time, cache in zip(
                request.keys, request.subkeys, request.values, request.expiration_time, in_cache
            )
        ]
        return dht_pb2.StoreResponse(store_ok=store_ok, peer=self.node_info)

    def check_record(self, record: DHTRecord) -> Optional[str]:
        """None if the record validator accepts ``record``, else why not: "invalid_record" or "validator_error"."""
        if self.record_validator is None:
            return None
        try:
            return None if self.record_validator.validate(record) else "invalid_record"
        except Exception as e:
            logger.debug(f"Record validator raised {e!r} on {record}")
            return "validator_error"

    def _is_valid(self, record: DHTRecord) -> bool:
        """Whether a record from a remote peer passes the validator; a rejection is counted."""
        reason = self.check_record(record)
        if reason is not None:
            self._reject(reason)
        return reason is None

    async def rpc_find(
        self,
        request: dht_pb2.FindRequest,
        context: P2PContext,
    ) -> dht_pb2.FindResponse:
        """
        For each key: our newest entry (storage or cache) and our nearest known nodes, excluding the caller. Values
        after the first are left out (answered as not found) once the response would carry more than
        MAX_FIND_RESPONSE_VALUE_BYTES of them, so that the response always fits in one message.
        """
        sender_id = self._check_sender(request.peer)
        try:
            check_find_request_shape(request.keys)
        except RequestRejected as e:
            self._reject(e.reason)
            raise
        if sender_id is not None:
            await self.update_routing_table(sender_id, context.remote_id, responded=True)
        response = dht_pb2.FindResponse(peer=self.node_info)
        value_bytes = 0
        encoded: Dict[DHTID, bytes] = {}  # dictionaries encoded for this request: a key may be named many times
        for key in request.keys:
            key_id = DHTID.from_bytes(key)
            result = response.results.add()
            item = self._get_local(key_id)
            if item is not None:
                is_dictionary = isinstance(item.value, DictionaryDHTValue)
                value = item.value
                if is_dictionary:
                    value = encoded.get(key_id)
                    if value is None:
                        value = encoded[key_id] = self.serializer.dumps(item.value)
                if value_bytes == 0 or value_bytes + len(value) <= MAX_FIND_RESPONSE_VALUE_BYTES:
                    value_bytes += len(value)
                    result.type = dht_pb2.FOUND_DICTIONARY if is_dictionary else dht_pb2.FOUND_REGULAR
                    result.value, result.expiration_time = value, item.expiration_time
                else:
                    self.rejected["find_response_full"] += 1  # the caller may ask for this key on its own
            neighbors = self.routing_table.get_nearest_neighbors(key_id, self.bucket_size, sender_id)
            result.nearest_node_ids.extend([self._codec.node_id_to_bytes(node_id) for node_id, _ in neighbors])
            result.nearest_peer_ids.extend([peer_id.to_bytes() for _, peer_id in neighbors])
        return response

    def _get_local(self, key_id: DHTID) -> Optional[ValueWithExpiration[StoredValue]]:
        """Whichever of the stored and the cached entries expires later."""
        stored, cached = self.storage.get(key_id), self.cache.get(key_id)
        if cached is not None and (stored is None or cached.expiration_time > stored.expiration_time):
            return cached
        return stored

    # ------------------------------------------------------------------ client side: calling remote peers

    async def _call(self, peer: PeerID, method: str, request):
        stub = self._stub(peer)
        if self.rpc_semaphore is None:
            return await getattr(stub, method)(request, timeout=self.wait_timeout)
        async with self.rpc_semaphore:
            return await getattr(stub, method)(request, timeout=self.wait_timeout)

    async def _on_failure(self, peer: PeerID, method: str, error: BaseException) -> None:
        logger.debug(f"{method} to {peer} failed: {error!r}")
        await self.update_routing_table(self.routing_table.get(peer_id=peer), peer, responded=False)

    def _node_id_of_response(self, node_info: dht_pb2.NodeInfo) -> Optional[DHTID]:
        check_node_id_bytes(node_info.node_id)  # a malformed id fails the call
        return DHTID.from_bytes(node_info.node_id) if node_info.node_id else None

    async def call_ping(
        self,
        peer: PeerID,
        validate: bool = False,  # ask the peer to call us back and compare clocks
        strict: bool = True,
    ) -> Optional[DHTID]:
        """
        Ping ``peer``; returns its node id, or None if it did not answer (or is a client).

        :param validate: ask the peer to check that it can reach us back, and check its clock against ours
        :param strict: if validation fails, raise :class:`ValidationError` instead of logging a warning
        """
        validate = validate and not self.client_mode  # a client has no node id, so it cannot be called back
        try:
            time_requested = get_dht_time()
            response = await self._call(peer, "rpc_ping", dht_pb2.PingRequest(peer=self.node_info, validate=validate))
            time_responded = get_dht_time()
            peer_node_id = self._node_id_of_response(response.peer)
        except Exception as e:
            await self._on_failure(peer, "ping", e)
            return None

        if validate:
            problems = []
            if not response.available:
                problems.append(f"peer {peer} cannot connect back to this peer (check announce_maddrs/firewall)")
            lower, upper = (
                time_requested - MAX_DHT_TIME_DISCREPANCY_SECONDS,
                time_responded + MAX_DHT_TIME_DISCREPANCY_SECONDS,
            )
            if response.dht_time != 0 and not lower <= response.dht_time <= upper:
                problems.append(
                    f"clock of peer {peer} differs from ours by more than {MAX_DHT_TIME_DISCREPANCY_SECONDS} s "
                    f"(its time {response.dht_time:.3f}, ours {time_requested:.3f}..{time_responded:.3f})"
                )
            for problem in problems:
                if strict:
                    raise ValidationError(problem)
                logger.warning(problem)

        if peer_node_id is not None:
            await self.update_routing_table(peer_node_id, peer, responded=True)
        return peer_node_id

    async def call_store(
        self,
        peer: PeerID,
        keys: Sequence[DHTID],
        values: Sequence[StoredValue],  # serialized values or whole dictionaries
        expiration_time: Union[DHTExpiration, Sequence[DHTExpiration]],
        subkeys: Optional[Sequence[Optional[Subkey]]] = None,
        in_cache: Optional[Union[bool, Sequence[bool]]] = None,  # one flag for all items, or one per item
    ) -> Optional[List[bool]]:
        """
        Ask ``peer`` to store (key, value, expiration) items; returns whether each was accepted, None if no answer
        (or if the request does not fit in one message: then it is never sent, and a warning says so).

        :param values: serialized (and signed) values, or whole DictionaryDHTValue objects (replication, caching)
        :param subkeys: None for regular values, else one subkey (or None for a regular value) per item
        :param in_cache: store into the peer's cache instead of its storage (one bool or one per item)
        """
        try:
            return await self.call_store_if_it_fits(peer, keys, values, expiration_time, subkeys, in_cache)
        except RequestTooLargeError as e:  # never sent: the peer did nothing wrong and stays in the routing table
            logger.warning(
                f"Store request of {len(keys)} item(s) to {peer} not sent: {e} (for the DHT: store large data "
                f"elsewhere and its location in the DHT)"
            )
            return None

    async def call_store_if_it_fits(
        self,
        peer: PeerID,
        keys: Sequence[DHTID],
        values: Sequence[StoredValue],
        expiration_time: Union[DHTExpiration, Sequence[DHTExpiration]],
        subkeys: Optional[Sequence[Optional[Subkey]]],  # (these two as in call_store, but required)
        in_cache: Optional[Union[bool, Sequence[bool]]],
    ) -> Optional[List[bool]]:
        """:meth:`call_store`, but a request that does not fit in one message raises RequestTooLargeError (not
        logged: the caller, which may send it to several peers, says so once)."""
        num_items = len(keys)
        expirations = [expiration_time] * num_items if isinstance(expiration_time, (int, float)) else expiration_time
        subkeys = [None] * num_items if subkeys is None else subkeys
        in_cache = [bool(in_cache)] * num_items if in_cache is None or isinstance(in_cache, bool) else in_cache
        if not (num_items == len(values) == len(expirations) == len(subkeys) == len(in_cache)):
            raise ValueError(f"keys, values, expirations, subkeys, in_cache must be aligned, got {num_items} keys")

        encoded_subkeys, encoded_values = [], []
        for subkey, value in zip(subkeys, values):
            if isinstance(value, DictionaryDHTValue):
                if subkey is not None:
                    raise ValueError(f"a whole dictionary is stored without a subkey, got subkey={subkey!r}")
                encoded_subkeys.append(IS_DICTIONARY)
                encoded_values.append(self.serializer.dumps(value))
            else:
                encoded_subkeys.append(IS_REGULAR_VALUE if subkey is None else self.serializer.dumps(subkey))
                encoded_values.append(value)
        request = dht_pb2.StoreRequest(
            keys=[key.to_bytes() for key in keys],
            subkeys=encoded_subkeys,
            values=encoded_values,
            expiration_time=expirations,
            in_cache=in_cache,
            peer=self.node_info,
        )
        try:
            response = await self._call(peer, "rpc_store", request)
            peer_node_id = self._node_id_of_response(response.peer)
            if len(response.store_ok) != num_items:
                raise RequestRejected("misaligned_fields", f"{len(response.store_ok)} results for {num_items} items")
        except RequestTooLargeError:  # never sent: the peer did nothing wrong and stays in the routing table
            raise
        except Exception as e:
            if isinstance(e, RequestRejected):
                self._reject(e.reason)
            await self._on_failure(peer, "store", e)
            return None
        if peer_node_id is not None:
            await self.update_routing_table(peer_node_id, peer, responded=True)
        return list(response.store_ok)

    async def call_find(self, peer: PeerID, keys: Collection[DHTID]) -> Optional[Dict[DHTID, FindResult]]:
        """
        Ask ``peer`` for its entries of ``keys`` and its nearest known nodes to each; None if it did not answer or
        answered with a malformed response. Entries that fail validation are returned as not found (a dictionary
        keeps its valid entries only).
        """
        keys = list(keys)
        request = dht_pb2.FindRequest(keys=[key.to_bytes() for key in keys], peer=self.node_info)
        try:
            response = await self._call(peer, "rpc_find", request)
            peer_node_id = self._node_id_of_response(response.peer)
            if len(response.results) != len(keys):
                raise RequestRejected("misaligned_fields", f"{len(response.results)} results for {len(keys)} keys")
            now = get_dht_time()
            output = {key: self._parse_find_result(key, result, now) for key, result in zip(keys, response.results)}
        except Exception as e:
            if isinstance(e, RequestRejected):
                self._reject(e.reason)
            await self._on_failure(peer, "find", e)
            return None
        if peer_node_id is not None:
            await self.update_routing_table(peer_node_id, peer, responded=True)
        return output

    def _parse_find_result(self, key: DHTID, result: dht_pb2.FindResult, now: float) -> FindResult:
        check_find_result_shape(
            result.type, result.expiration_time, result.nearest_node_ids, result.nearest_peer_ids, now
        )
        nearest = {
            self._codec.node_id_from_bytes(node_id): self._codec.peer_id_from_bytes(peer_id)
            for node_id, peer_id in zip(result.nearest_node_ids, result.nearest_peer_ids)
        }
        key_bytes = key.to_bytes()
        if result.type == dht_pb2.FOUND_REGULAR:
            reason = check_value_bytes(result.value)  # e.g. nested too deep: would fail every reader, never cached
            if reason is not None:
                self._reject(reason)
                return None, nearest
            if not self._is_valid(DHTRecord(key_bytes, IS_REGULAR_VALUE, result.value, result.expiration_time)):
                return None, nearest
            return ValueWithExpiration(result.value, result.expiration_time), nearest
        if result.type == dht_pb2.FOUND_DICTIONARY:
            dictionary = self._parse_dictionary(key_bytes, result.value, now)
            if dictionary is None or len(dictionary) == 0:
                return None, nearest
            return ValueWithExpiration(dictionary, dictionary.latest_expiration_time), nearest
        return None, nearest

    def _parse_dictionary(self, key_bytes: bytes, value: bytes, now: float) -> Optional[DictionaryDHTValue]:
        """Decode a dictionary from a find response, keeping only its well-formed and valid entries."""
        layout = dictionary_layout(value)  # each entry's subkey as received: none is encoded again
        decoded = self._decode_dictionary_entries(value, "a find response", None if layout is None else layout[0])
        if decoded is None:
            return None
        entries, _ = decoded
        clean = DictionaryDHTValue()
        for subkey, entry_value, entry_expiration, span in entries:
            reason = check_dictionary_entry(entry_value, entry_expiration, now)
            if reason is not None:
                self._reject(reason)
                continue
            encoded_subkey, nbytes = self._dictionary_subkey_bytes(subkey, span)
            if self._is_valid(DHTRecord(key_bytes, encoded_subkey, entry_value, entry_expiration)):
                clean.store(subkey, entry_value, entry_expiration, nbytes)
        return clean
