"""A find request that names one key many times costs the answering node one encoding of that key's dictionary, not
one per mention: a 90 KB request naming a 1 MB dictionary 4096 times held the node's event loop for ~30 s."""

import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.request_checks import MAX_KEYS_PER_FIND
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2PContext
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


class CountingSerializer(MSGPackSerializer):
    dumps_calls = 0

    @classmethod
    def dumps(cls, obj: object) -> bytes:
        CountingSerializer.dumps_calls += 1
        return super().dumps(obj)


@pytest.mark.timeout(60)
async def test_a_key_named_many_times_is_encoded_once(p2p_factory):
    protocol = await DHTProtocol.create(await p2p_factory(), DHTID.generate(), 20, 5, 5, wait_timeout=5)
    try:
        key_id = DHTID.generate("big dictionary")
        expiration = get_dht_time() + 600
        for subkey in range(100):
            assert protocol.storage.store(key_id, bytes(100), expiration, subkey=subkey)
        protocol.serializer = CountingSerializer
        request = dht_pb2.FindRequest(keys=[key_id.to_bytes()] * MAX_KEYS_PER_FIND, peer=dht_pb2.NodeInfo())
        context = P2PContext(handle_name="DHTProtocol.rpc_find", local_id=protocol.p2p.peer_id)
        response = await protocol.rpc_find(request, context)
        assert len(response.results) == MAX_KEYS_PER_FIND
        assert response.results[0].type == dht_pb2.FOUND_DICTIONARY
        assert CountingSerializer.dumps_calls == 1
    finally:
        await protocol.shutdown()
