"""forward_timeout bounds a forward of a batch without samples too: its first call fetches the experts' schema
(a beam search and rpc_info), which a slow DHT must not stretch past the time limit."""

import time

import pytest
import torch
from moe_client_fakes import FakeExpertServer
from test_moe_routing import GRID, HID, UIDS, SlowDHT, make_experts

from hivemind.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts


@pytest.fixture(scope="module")
def slow_client_dht():
    """A client DHT whose every search takes 20 s, and an expert server it knows."""
    server = FakeExpertServer(make_experts(UIDS), HID)
    slow_dht = SlowDHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield slow_dht
    finally:
        slow_dht.shutdown()
        server.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("layer", [RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts])
def test_empty_batch_forward_on_a_slow_dht_ends_at_forward_timeout(slow_client_dht, layer):
    moe = layer(in_features=HID, grid_size=GRID, dht=slow_client_dht, uid_prefix="ffn.", k_best=2, forward_timeout=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="forward_timeout"):
        moe(torch.randn(0, HID))
    assert time.monotonic() - started < 5  # far from the 20 s the search takes
