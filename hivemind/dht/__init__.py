"""hivemind.dht: a Kademlia DHT over libp2p — the DHT process (DHT), the asyncio node (DHTNode), ids and values."""

from hivemind.dht.dht import DHT
from hivemind.dht.node import DEFAULT_NUM_WORKERS, DHTNode
from hivemind.dht.routing import DHTID, DHTValue
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase

__all__ = [
    "DHT",
    "DHTNode",
    "DHTID",
    "DHTValue",
    "DEFAULT_NUM_WORKERS",
    "CompositeValidator",
    "DHTRecord",
    "RecordValidatorBase",
]
