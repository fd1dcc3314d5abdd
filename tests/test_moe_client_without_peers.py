"""A mixture whose DHT knows no other peer (initial_peers forgotten) says so, not only "No responding experts"."""

import pytest
import torch

import hivemind
from hivemind.moe import RemoteMixtureOfExperts

pytestmark = pytest.mark.timeout(60)


def test_a_mixture_on_a_dht_without_peers_says_to_pass_initial_peers():
    # it said 'No responding experts found ...; check that expert servers run and that this DHT is connected to
    # them', the same as for a connected DHT whose swarm has no such experts
    with hivemind.DHT(start=True) as lone:
        moe = RemoteMixtureOfExperts(in_features=8, grid_size=(4,), dht=lone, uid_prefix="ffn.", k_best=2)
        with pytest.raises(RuntimeError, match=r"No responding experts found .*this DHT knows no other peer\. Pass "):
            moe(torch.randn(2, 8))
        with pytest.raises(RuntimeError, match=r"this DHT knows no other peer\. Pass initial_peers=\[\.\.\.\]"):
            _ = moe.info

        with hivemind.DHT(initial_peers=lone.get_visible_maddrs(), start=True) as connected:
            moe = RemoteMixtureOfExperts(in_features=8, grid_size=(4,), dht=connected, uid_prefix="ffn.", k_best=2)
            with pytest.raises(RuntimeError, match="No responding experts found") as info:
                moe(torch.randn(2, 8))
            assert "knows no other peer" not in str(info.value)
            assert "check that expert servers run" in str(info.value)
