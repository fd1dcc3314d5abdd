"""
Sending the entries of many keys to their replicas in few requests: every key's entries that go to one peer travel
together with other keys' in one StoreRequest (up to MAX_ITEMS_PER_REQUEST items / MAX_BYTES_PER_REQUEST bytes of
values and subkeys), instead of one request per key and replica, which with thousands of keys ran out of time
(each request may take wait_timeout) and left most remote replicas without the keys.
"""

import asyncio
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from hivemind.dht.rate_limit import (
    DEFAULT_BURST_ITEMS,
    DEFAULT_ITEMS_PER_SECOND,
    DEFAULT_MAX_REQUEST_ITEMS,
    store_item_cost,
)
from hivemind.dht.request_checks import IS_REGULAR_VALUE
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import RequestTooLargeError
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer

logger = get_logger(__name__)

MAX_ITEMS_PER_REQUEST = 2048  # store items (entries) in one request
MAX_BYTES_PER_REQUEST = 1 << 20  # value and subkey bytes in one request (a request may carry at most 4 MiB)
REQUESTS_PER_PEER = 2  # requests of one fan-out in flight to one peer at once
# a replica of ours refuses (all False) a request that costs more than its store rate limit holds for the sender:
# requests cost at most a quarter of a fresh peer's allowance, and are paced to its refill (see SendPacer)
MAX_COST_PER_REQUEST = DEFAULT_BURST_ITEMS / 4

# send(peer, key_ids, entries) -> one bool per entry, or None if the peer did not answer; raises RequestTooLargeError
# (never sent) if the request does not fit in one message
SendFn = Callable[[PeerID, List[DHTID], List[Any]], Any]


class KeyProgress:
    """
    One key's store: its entries, the candidates not yet asked (nearest first), and the answers so far. Each entry's
    status is the one from the last answer processed; the key is done once ``wanted`` candidates answered (accepted
    or refused) or none is left to ask.
    """

    __slots__ = (
        "key_id",
        "entries",
        "untried",
        "wanted",
        "in_flight",
        "answered",
        "statuses",
        "result",
        "nbytes",
        "cost",
        "too_large",
    )

    def __init__(
        self,
        key_id: DHTID,
        entries: Sequence[Any],
        candidates: Sequence[Tuple[DHTID, PeerID]],
        wanted: int,
        result: Optional[asyncio.Future] = None,
    ):
        self.key_id, self.entries, self.untried, self.wanted = key_id, list(entries), list(candidates), wanted
        self.in_flight = 0
        self.answered: Set[DHTID] = set()  # candidates that answered (accepted or refused)
        self.statuses = [False] * len(self.entries)
        self.result = result
        # what its entries add to a request: values and subkeys (a subkey may be as large as a value), and what they
        # cost in a replica's store rate limit
        self.nbytes, self.cost = 0, 0.0
        self.too_large = False  # its entries do not fit in one message: no remote peer can be asked
        for _, subkey, value, _ in self.entries:  # (value: the serialized and signed bytes)
            subkey_bytes = IS_REGULAR_VALUE if subkey is None else MSGPackSerializer.dumps(subkey)
            self.nbytes += len(value) + len(subkey_bytes)
            self.cost += store_item_cost(subkey_bytes, value)

    def resolve(self) -> None:
        if self.result is not None and not self.result.done():
            self.result.set_result(list(self.statuses))


class SendPacer:
    """
    What this node has spent of each peer's store rate limit (as a replica of ours counts it, with its default
    allowance), so that requests wait for the allowance to refill rather than go out to be refused: a replica of ours
    answers a request beyond the sender's allowance with False for every item (store_many of 40000 small keys to
    one peer: 18432 refused; of 2000 keys holding 64 floats each: 1811 refused). It spends at most PACED_SHARE of the
    allowance and of its refill: requests may reach the peer closer together than they left, and the peer counts
    this node's other requests too.
    """

    PACED_SHARE = 0.75

    def __init__(
        self,
        burst: float = DEFAULT_BURST_ITEMS,
        rate: float = DEFAULT_ITEMS_PER_SECOND,
        max_request: float = DEFAULT_MAX_REQUEST_ITEMS,
    ):
        self.burst, self.rate, self.max_request = burst, rate, max_request  # the peer's
        self._buckets: Dict[PeerID, Tuple[float, float]] = {}  # peer -> (allowance left, time of last update)

    async def wait(self, peer_id: PeerID, cost: float) -> None:
        """
        Wait until ``peer_id`` would take a request of ``cost``, and count it as spent: one that costs more than the
        allowance waits for it to be whole, then leaves it in debt (as the peer borrows for it, see PeerRateLimiter).
        """
        if cost > self.max_request:  # refused however long it waits: send it at once
            return
        loop = asyncio.get_running_loop()
        burst, rate = self.burst * self.PACED_SHARE, self.rate * self.PACED_SHARE
        needed = min(cost, burst)
        while True:
            now = loop.time()
            tokens, updated = self._buckets.get(peer_id, (burst, now))
            tokens = min(burst, tokens + (now - updated) * rate)
            if tokens >= needed:
                self._buckets[peer_id] = (tokens - cost, now)
                if len(self._buckets) > 1024:  # forget peers whose allowance is whole again
                    self._buckets = {
                        peer: (left, at)
                        for peer, (left, at) in self._buckets.items()
                        if left + (now - at) * rate < burst
                    }
                return
            self._buckets[peer_id] = (tokens, now)
            await asyncio.sleep((needed - tokens) / rate)


class StoreFanout:
    """
    Stores many keys on their candidates: a key is sent to its nearest candidates until ``wanted`` of them answered,
    a silent candidate is replaced by the next one. Requests to one peer carry many keys; a peer that did not answer
    is not asked again by this fan-out (the keys waiting for it go to their next candidates at once).

    :param local_node_id: candidates with this id are this node: ``store_locally(key)`` answers at once
    :param on_answer: ``(key, statuses)`` after each answer, before the key's result may be set
    :param on_done: ``(key)`` once a key is done (all its answers in), after its result was set
    :param pacer: what this node has spent of each peer's store rate limit (shared by all the node's stores: a
      replica of ours counts them together)
    :param early_result: set a key's result at its first answer that accepted an entry (the others still follow)
    """

    def __init__(
        self,
        local_node_id: DHTID,
        send: SendFn,
        store_locally: Callable[[KeyProgress], List[bool]],
        on_answer: Callable[[KeyProgress, List[bool]], None],
        on_done: Callable[[KeyProgress], None],
        pacer: SendPacer,
        early_result: bool = False,
    ):
        self.local_node_id, self.send, self.store_locally, self.pacer = local_node_id, send, store_locally, pacer
        self.on_answer, self.on_done, self.early_result = on_answer, on_done, early_result
        self._queues: Dict[PeerID, Deque[Tuple[KeyProgress, DHTID]]] = {}  # (key, the node id it is sent to)
        self._senders: Dict[PeerID, Set[asyncio.Task]] = {}
        self._silent_peers: Set[PeerID] = set()
        self._all_senders: Set[asyncio.Task] = set()
        self._warned_too_large = False  # a key too large for a message is warned about once per fan-out

    async def run(self, keys: Sequence[KeyProgress]) -> None:
        """Store every key; on return (or cancellation) each key's result is set."""
        try:
            for key in keys:
                self._advance(key)
            while self._all_senders:
                done, _ = await asyncio.wait(self._all_senders, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._all_senders.discard(task)
                    task.result()  # a sender's error is a bug: raise it
        finally:
            for task in self._all_senders:
                task.cancel()
            await asyncio.gather(*self._all_senders, return_exceptions=True)
            for key in keys:
                key.resolve()

    def _take_answer(self, key: KeyProgress, node_id: DHTID, statuses: List[bool]) -> None:
        key.statuses = list(statuses)
        key.answered.add(node_id)
        self.on_answer(key, key.statuses)
        if self.early_result and any(key.statuses):
            key.resolve()

    def _advance(self, key: KeyProgress) -> None:
        """Ask the next candidates of ``key`` while fewer than ``wanted`` answered or are being asked."""
        while key.untried and len(key.answered) + key.in_flight < key.wanted:
            node_id, peer_id = key.untried.pop(0)
            if node_id == self.local_node_id:
                self._take_answer(key, node_id, self.store_locally(key))
            elif peer_id not in self._silent_peers:
                key.in_flight += 1
                self._queues.setdefault(peer_id, deque()).append((key, node_id))
                senders = self._senders.setdefault(peer_id, set())
                if len(senders) < REQUESTS_PER_PEER:
                    task = asyncio.create_task(self._send_to(peer_id))
                    senders.add(task)
                    self._all_senders.add(task)
        if key.in_flight == 0:
            key.resolve()
            self.on_done(key)

    def _next_request(self, queue: Deque[Tuple[KeyProgress, DHTID]]) -> List[Tuple[KeyProgress, DHTID]]:
        """Keys from the front of ``queue`` for one request (at least one, however large)."""
        batch = [queue.popleft()]
        num_items, num_bytes, cost = len(batch[0][0].entries), batch[0][0].nbytes, batch[0][0].cost
        while queue:
            key = queue[0][0]
            if (
                num_items + len(key.entries) > MAX_ITEMS_PER_REQUEST
                or num_bytes + key.nbytes > MAX_BYTES_PER_REQUEST
                or cost + key.cost > MAX_COST_PER_REQUEST
            ):
                break
            batch.append(queue.popleft())
            num_items, num_bytes, cost = num_items + len(key.entries), num_bytes + key.nbytes, cost + key.cost
        return batch

    def _give_up_too_large(self, batch: List[Tuple[KeyProgress, DHTID]], error: Exception) -> None:
        """A request that does not fit in a message was not sent: a key alone in it is not sent to any other peer
        either (a warning says so, once per fan-out); keys that were together go to their next candidates."""
        if not self._warned_too_large:
            logger.warning(
                f"A store request of {sum(len(key.entries) for key, _ in batch)} item(s) was not sent to any remote "
                f"peer: {error} (for the DHT: store large data elsewhere and its location in the DHT)"
            )
            self._warned_too_large = True
        for key, _ in batch:
            key.in_flight -= 1
            if len(batch) == 1:
                key.too_large = True
                key.untried = [(node_id, peer) for node_id, peer in key.untried if node_id == self.local_node_id]
            self._advance(key)

    async def _send_to(self, peer_id: PeerID) -> None:
        queue = self._queues[peer_id]
        try:
            while queue:
                batch = self._next_request(queue)
                await self.pacer.wait(peer_id, sum(key.cost for key, _ in batch))
                key_ids = [key.key_id for key, _ in batch for _ in key.entries]
                try:
                    response = await self.send(peer_id, key_ids, [entry for key, _ in batch for entry in key.entries])
                except RequestTooLargeError as e:
                    self._give_up_too_large(batch, e)
                    continue
                if response is None:  # silent: the keys waiting for it go to their next candidates
                    self._silent_peers.add(peer_id)
                    batch.extend(queue)
                    queue.clear()
                    for key, _ in batch:
                        key.in_flight -= 1
                        self._advance(key)
                    continue
                offset = 0
                for key, node_id in batch:
                    statuses = response[offset : offset + len(key.entries)]
                    offset += len(key.entries)
                    key.in_flight -= 1
                    self._take_answer(key, node_id, statuses)
                    self._advance(key)
        finally:
            self._senders[peer_id].discard(asyncio.current_task())
