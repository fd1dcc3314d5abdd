"""A Server of given experts and a client DHT that already sees them, for tests of mixtures over a real swarm."""

import contextlib
import time
from typing import Dict, Iterator, Tuple

from hivemind.dht import DHT
from hivemind.moe import ModuleBackend, Server
from hivemind.moe.server.dht_handler import get_experts


@contextlib.contextmanager
def serving_experts(backends: Dict[str, ModuleBackend], **server_kwargs) -> Iterator[Tuple[Server, DHT]]:
    """Start a Server of ``backends`` and a client DHT; yield (server, client DHT) once every uid is announced."""
    server = Server(DHT(start=True), backends, start=True, **server_kwargs)
    client_dht = DHT(initial_peers=server.dht.get_visible_maddrs(), start=True)
    try:
        deadline = time.monotonic() + 30
        while None in get_experts(client_dht, list(backends)):  # the first announcement runs beside the start
            assert time.monotonic() < deadline, "the server did not announce its experts"
            time.sleep(0.1)
        yield server, client_dht
    finally:
        client_dht.shutdown()
        server.shutdown()
