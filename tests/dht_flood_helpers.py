"""Shared pieces of the tests that send a DHTProtocol hostile store requests and measure the CPU they cost it."""

import gc
import time
from typing import Awaitable, Callable, Dict, Hashable, List, Sequence, Tuple

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import DEFAULT_BURST_ITEMS, PeerRateLimiter, store_item_cost
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


class StoppedClock:
    """A victim's rate-limit clock that moves only when told. Tokens refill at 2 000 items per second, so with the
    real clock a burst that a loaded machine handled slowly was refilled while it was handled and stored more than a
    fresh peer's allowance holds (4 of 4 dictionaries of 5 000 tuple-subkey entries, charged for 3: 5.9 s of wall time
    for 0.56 s of CPU, 2 CPU-heavy processes beside)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def victim_and_attacker(p2p_factory, stopped_clock: bool = False) -> Tuple[DHTProtocol, object]:
    """A DHTProtocol (the victim, served in this process) and a second P2P instance that knows it; with
    ``stopped_clock``, the victim's store rate limiter runs on a StoppedClock (see least_cpu_in_turn)."""
    victim_p2p = await p2p_factory()
    attacker = await p2p_factory(initial_peers=await victim_p2p.get_visible_maddrs())
    victim = await DHTProtocol.create(victim_p2p, DHTID.generate(), 20, 5, 5, wait_timeout=60)
    if stopped_clock:
        victim.store_rate_limiter = PeerRateLimiter(clock=StoppedClock())
    return victim, attacker


def store_request(values: Sequence[bytes], subkey: bytes = DHTProtocol.IS_REGULAR_VALUE) -> dht_pb2.StoreRequest:
    """A StoreRequest of ``values`` under fresh random keys, each with ``subkey``, expiring in 10 minutes."""
    return dht_pb2.StoreRequest(
        keys=[DHTID.generate().to_bytes() for _ in values],
        subkeys=[subkey] * len(values),
        values=list(values),
        expiration_time=[get_dht_time() + 600] * len(values),
        peer=dht_pb2.NodeInfo(),
    )


async def timed_store(stub, request: dht_pb2.StoreRequest) -> Tuple[float, dht_pb2.StoreResponse]:
    """Send ``request``; the CPU seconds this process (which runs the victim's handler; p2pd is another) spent."""
    started = time.process_time()
    response = await stub.rpc_store(request, timeout=60)
    return time.process_time() - started, response


async def flood_until_refused(
    stub, make_request: Callable[[int], dht_pb2.StoreRequest], max_requests: int
) -> Tuple[float, int]:
    """Send ``make_request(0)``, ``make_request(1)``, ... until one is refused whole (or ``max_requests`` were sent):
    the CPU seconds they cost this process (see timed_store) and how many of their items were stored."""
    spent, accepted = 0.0, 0
    for index in range(max_requests):
        cpu, response = await timed_store(stub, make_request(index))
        spent, accepted = spent + cpu, accepted + sum(response.store_ok)
        if not any(response.store_ok):
            break
    return spent, accepted


async def least_cpu_in_turn(
    victim: DHTProtocol, runs: Dict[str, Callable[[], Awaitable[Tuple[float, Hashable]]]], rounds: int = 3
) -> Tuple[Dict[str, float], Dict[str, Hashable]]:
    """Each of ``runs`` (a coroutine function -> (CPU seconds, what it stored)) awaited ``rounds`` times in turn, each
    time with a fresh peer's whole allowance (the victim's StoppedClock moved on by an hour) and an emptied storage:
    the least CPU time each took and what it stored (the same each time, or this fails). One run of the same work took
    up to 2x the least when other processes shared the 2 cores (CPU time grows with contention, e.g. 0.18-0.35 s for
    0.18 s of work), so a test compares its run with a reference run measured alike, in turn (reference_int_values or
    reference_int_entries), and not with a bound in seconds."""
    assert isinstance(victim.store_rate_limiter.clock, StoppedClock), "see victim_and_attacker(stopped_clock=True)"
    least, stored = {}, {}
    for _ in range(rounds):
        for name, run in runs.items():
            victim.storage.clear()
            gc.collect()  # each run starts with the collector's counts at zero (see conftest.frozen_heap)
            victim.store_rate_limiter.clock.now += 3600.0  # the allowance is whole again
            spent, outcome = await run()
            least[name] = min(spent, least.get(name, spent))
            stored.setdefault(name, set()).add(outcome)
    assert all(len(outcomes) == 1 for outcomes in stored.values()), stored
    return least, {name: outcomes.pop() for name, outcomes in stored.items()}


def one_burst(stub, values: Sequence[bytes], subkey: bytes = DHTProtocol.IS_REGULAR_VALUE):
    """A run for least_cpu_in_turn: ``values`` sent in one request (store_request); what it stored is its store_ok."""

    async def run() -> Tuple[float, Tuple[bool, ...]]:
        spent, response = await timed_store(stub, store_request(values, subkey=subkey))
        return spent, tuple(response.store_ok)

    return run


async def fresh_peers_bursts(
    victim, attacker, bursts: Dict[str, List[bytes]], subkey: bytes = DHTProtocol.IS_DICTIONARY, rounds: int = 3
) -> Tuple[Dict[str, float], Dict[str, List[bool]]]:
    """Each burst of values (whole dictionaries by default), one request each, sent ``rounds`` times in turn by
    least_cpu_in_turn: the least CPU time each took and what it stored (store_ok)."""
    stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
    runs = {name: one_burst(stub, values, subkey) for name, values in bursts.items()}
    least, stored = await least_cpu_in_turn(victim, runs, rounds)
    return least, {name: list(outcome) for name, outcome in stored.items()}


def burst_of_values(make_value) -> List[bytes]:
    """As many values ``make_value(0)``, ``make_value(1)``... as fit in a fresh peer's allowance."""
    values, cost = [], 0.0
    while True:
        value = MSGPackSerializer.dumps(make_value(len(values)))
        cost += store_item_cost(DHTProtocol.IS_REGULAR_VALUE, value)
        if cost > DEFAULT_BURST_ITEMS - 1:
            return values
        values.append(value)


def encoded_dictionaries(entry, num_entries: int, num_dictionaries: int) -> List[bytes]:
    """``num_dictionaries`` whole dictionaries of ``num_entries`` entries each, ``entry(index)`` -> (subkey, value)."""
    expiration, dictionaries = get_dht_time() + 600, []
    for first in range(0, num_entries * num_dictionaries, num_entries):
        dictionary = DictionaryDHTValue()
        for index in range(first, first + num_entries):
            subkey, value = entry(index)
            dictionary.store(subkey, MSGPackSerializer.dumps(value), expiration)
        dictionaries.append(MSGPackSerializer.dumps(dictionary))
    return dictionaries


# the references: a fresh peer's burst of int entries of whole dictionaries, ~1.003 items each (and one per
# dictionary): 4 x 4 900 fit its allowance of 20 000, all stored (0.26-0.34 s of CPU when measured alone) ...
INT_ENTRIES: Tuple = (lambda index: (index, index + 1), 4900, 4)


def reference_int_entries(stub):
    """... a run for least_cpu_in_turn of that burst of int entries ..."""
    return one_burst(stub, encoded_dictionaries(*INT_ENTRIES), DHTProtocol.IS_DICTIONARY)


def reference_int_values(stub):
    """... and one of a fresh peer's burst of int values (~20 000 in one request, 0.19 s of CPU when alone)."""
    return one_burst(stub, burst_of_values(lambda index: index))
