"""Shared pieces of the tests that send a DHTProtocol hostile store requests and measure the CPU they cost it."""

import time
from typing import Callable, Sequence, Tuple

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.proto import dht_pb2
from hivemind.utils.timed_storage import get_dht_time


async def victim_and_attacker(p2p_factory) -> Tuple[DHTProtocol, object]:
    """A DHTProtocol (the victim, served in this process) and a second P2P instance that knows it."""
    victim_p2p = await p2p_factory()
    attacker = await p2p_factory(initial_peers=await victim_p2p.get_visible_maddrs())
    victim = await DHTProtocol.create(victim_p2p, DHTID.generate(), 20, 5, 5, wait_timeout=60)
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
