"""Expert declarations read from the DHT are validated: entries whose peer id is not a libp2p peer id are dropped
when they are read (beam search and get_experts), not handed out as experts that fail only when called."""

import base58
import pytest

from hivemind.dht import DHT
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.moe.expert_uid import parse_peer_id
from hivemind.moe.server.dht_handler import declare_experts, get_experts
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

SHA256_PEER = "QmTkFQf2PN5tMxy6pbwcKKWWKt8CMjfNaY4fxKU3V7StGN"
ED25519_PEER = "12D3KooWD8cGDrtasVn3NBDfZzpP6ndwV2sX3M1dc5VHVRXD8M1h"
BOGUS_PEERS = [
    "abc",  # valid base58, but not a multihash
    "0OIl",  # not base58
    "1" * 5000,  # far too long (decoding base58 this long would cost quadratic time)
    base58.b58encode(bytes([0x12, 32]) + b"\x01" * 31).decode(),  # sha2-256 with a short digest
    base58.b58encode(bytes([0x00, 50]) + b"\x01" * 50).decode(),  # identity longer than libp2p inlines
    base58.b58encode(bytes([0x13, 32]) + b"\x01" * 32).decode(),  # another hash function
    "",
]


@pytest.mark.parametrize("peer", [SHA256_PEER, ED25519_PEER])
def test_libp2p_peer_ids_are_accepted(peer):
    assert parse_peer_id(peer) == PeerID.from_base58(peer)


@pytest.mark.parametrize("value", [*BOGUS_PEERS, None, 42, b"QmTk", ["QmTk"]], ids=repr)
def test_anything_else_is_not_a_peer_id(value):
    assert parse_peer_id(value) is None


@pytest.fixture(scope="module")
def dht_with_garbage():
    """A DHT holding one real declaration (garbage.0.0, by this DHT's peer) and garbage under other expert keys."""
    dht = DHT(start=True)
    try:
        expiration = get_dht_time() + 300
        assert all(declare_experts(dht, ["garbage.0.0"], expiration).values())
        for coordinate, peer in enumerate(BOGUS_PEERS, start=1):
            uid = f"garbage.0.{coordinate}"
            assert dht.store("garbage.0.", (uid, peer), expiration, subkey=coordinate)
            assert dht.store(uid, peer, expiration)
        for coordinate, peer in enumerate(BOGUS_PEERS):
            assert dht.store("garbage.1.", (f"garbage.1.{coordinate}", peer), expiration, subkey=coordinate)
        yield dht
    finally:
        dht.shutdown()


def test_beam_search_drops_declarations_with_bogus_peer_ids(dht_with_garbage):
    dht = dht_with_garbage
    searcher = MoEBeamSearcher(dht, "garbage.", (2, 8), negative_caching=False)
    successors = searcher.get_active_successors(["garbage.0.", "garbage.1."])
    assert {prefix: sorted(found) for prefix, found in successors.items()} == {"garbage.0.": [0], "garbage.1.": []}
    assert successors["garbage.0."][0].peer_id == dht.peer_id
    # the best scores point at the garbage: the search still finds only the real expert
    experts = searcher.find_best_experts([[0.0, 9.0], [0.0] + [9.0] * 7], beam_size=4)
    assert [(expert.uid, expert.peer_id) for expert in experts] == [("garbage.0.0", dht.peer_id)]


def test_get_experts_drops_declarations_with_bogus_peer_ids(dht_with_garbage):
    dht = dht_with_garbage
    uids = [f"garbage.0.{coordinate}" for coordinate in range(len(BOGUS_PEERS) + 1)]
    experts = get_experts(dht, uids)
    assert experts[0].uid == "garbage.0.0" and experts[0].peer_id == dht.peer_id
    assert experts[1:] == [None] * len(BOGUS_PEERS)
