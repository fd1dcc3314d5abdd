"""RemoteExpert and create_remote_experts refuse arguments they cannot call an expert with, instead of an
AttributeError from an internal line, or an expert that fails at its first call."""

import pytest

from hivemind.dht import DHT
from hivemind.moe import RemoteExpert
from hivemind.moe.client.expert import batch_create_remote_experts, create_remote_experts
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo


@pytest.fixture(scope="module")
def dht_and_p2p():
    with DHT(start=True) as dht:
        yield dht, RemoteExpertWorker.run_coroutine(dht.replicate_p2p())


def test_a_peer_id_given_as_a_string_is_refused(dht_and_p2p):
    dht, p2p = dht_and_p2p
    with pytest.raises(TypeError, match=r"peer_id must be a PeerID.*PeerID\.from_base58"):
        RemoteExpert(ExpertInfo("ffn.0", dht.peer_id.to_base58()), p2p)


@pytest.mark.parametrize("info", ["ffn.0", None, ("ffn.0", "peer")], ids=["uid", "None", "tuple"])
def test_something_that_is_not_an_expert_info_is_refused(dht_and_p2p, info):
    dht, p2p = dht_and_p2p
    with pytest.raises(TypeError, match=r"expert_info must be an ExpertInfo\(uid, peer_id\).*get_experts"):
        RemoteExpert(info, p2p)


def test_create_remote_experts_with_uids_says_how_to_find_experts_by_uid(dht_and_p2p):
    dht, _ = dht_and_p2p
    with pytest.raises(TypeError, match=r"got str 'ffn.0'.*hivemind.moe.get_experts\(dht, uids\)"):
        create_remote_experts(["ffn.0"], dht)
    assert create_remote_experts([None], dht) == [None]


def test_a_dht_instead_of_a_p2p_is_refused(dht_and_p2p):
    dht, p2p = dht_and_p2p
    with pytest.raises(TypeError, match=r"p2p must be a hivemind.p2p.P2P.*dht.replicate_p2p\(\)"):
        RemoteExpert(ExpertInfo("ffn.0", dht.peer_id), dht)
    assert RemoteExpert(ExpertInfo("ffn.0", dht.peer_id), p2p).uid == "ffn.0"


def test_batch_create_remote_experts_keeps_none_for_experts_not_found(dht_and_p2p):
    """get_experts gives None for a uid not found in the DHT; hivemind 1.1.12 keeps it as None in each row."""
    dht, _ = dht_and_p2p
    info = ExpertInfo("ffn.0", dht.peer_id)
    (row, empty) = batch_create_remote_experts([[info, None], []], dht)
    assert row[0].uid == "ffn.0" and row[1] is None and empty == []
