"""Shared pieces of the tests that send a DHTProtocol hostile store requests and measure the CPU they cost it."""

import time
from typing import Sequence, Tuple

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
