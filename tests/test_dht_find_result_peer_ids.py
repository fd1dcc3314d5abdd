"""A find response's neighbour peer ids are refused unless they can be libp2p peer ids (at most MAX_PEER_ID_BYTES):
printing a PeerID costs base58 encoding, which is quadratic, so a 3 MB 'peer id' in a response held the event loop
for hours the first time a failed call to it was logged."""

import time

import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.request_checks import RequestRejected, check_find_result_shape
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import dht_pb2
from hivemind.utils.timed_storage import get_dht_time

HUGE_PEER_ID = b"\xff" * 20_000  # its base58 form takes about a second (200 KB: 90 s)


@pytest.mark.parametrize("peer_id", [HUGE_PEER_ID, bytes(129), b""], ids=["huge", "129", "empty"])
def test_find_result_with_an_impossible_peer_id_is_rejected(peer_id):
    with pytest.raises(RequestRejected) as info:
        check_find_result_shape(0, 0.0, [DHTID.generate().to_bytes()], [peer_id], get_dht_time())
    assert info.value.reason == "bad_peer_id"


def test_find_result_with_real_peer_ids_passes():
    peer_ids = [bytes([0x12, 32]) + bytes(32), bytes([0x00, 36]) + bytes(36)]  # sha2-256, inlined ed25519 key
    check_find_result_shape(0, 0.0, [DHTID.generate().to_bytes()] * 2, peer_ids, get_dht_time())


async def hostile_rpc_find(self, request: dht_pb2.FindRequest, context: P2PContext) -> dht_pb2.FindResponse:
    """Answers every key with one neighbour whose peer id is 20 KB long."""
    response = dht_pb2.FindResponse(peer=self.node_info)
    for _ in request.keys:
        result = response.results.add()
        result.nearest_node_ids.append(DHTID.generate().to_bytes())
        result.nearest_peer_ids.append(HUGE_PEER_ID)
    return response


@pytest.mark.timeout(30)
async def test_call_find_refuses_a_response_with_a_huge_peer_id():
    hostile_type = type("DHTProtocol", (DHTProtocol,), {"rpc_find": hostile_rpc_find})  # same handler names
    p2p_a = await P2P.create()
    p2p_b = await P2P.create(initial_peers=await p2p_a.get_visible_maddrs())
    hostile = await hostile_type.create(p2p_a, DHTID.generate(), 20, 5, 5, wait_timeout=5)
    caller = await DHTProtocol.create(p2p_b, DHTID.generate(), 20, 5, 5, wait_timeout=5)
    try:
        started = time.monotonic()
        assert await caller.call_find(p2p_a.peer_id, [DHTID.generate()]) is None
        assert caller.rejected["bad_peer_id"] == 1
        assert time.monotonic() - started < 10
    finally:
        for item in (caller, hostile, p2p_b, p2p_a):
            await item.shutdown()
