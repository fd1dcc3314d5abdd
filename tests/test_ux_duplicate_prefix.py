"""A second averager with the prefix of a running one on the same DHT (e.g. an Optimizer created again with the same
run_id before the old one was shut down) fails with a message that says so, and the first one keeps working."""

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.p2p import P2PDaemonError


@pytest.mark.timeout(60)
def test_second_averager_with_the_same_prefix_names_the_prefix_and_the_remedy():
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
        with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht.get_visible_maddrs()) as other:
            options = dict(prefix="ux_dup", target_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0)
            first = DecentralizedAverager([torch.zeros(3)], dht, start=True, **options)
            try:
                # it said only "p2pd returned an error: handler for protocol ux_dup::...rpc_... already set"
                with pytest.raises(
                    P2PDaemonError,
                    match="another DecentralizedAverager with prefix 'ux_dup' "
                    "already runs on this DHT .*shut it down first, or give this one another prefix",
                ):
                    DecentralizedAverager([torch.zeros(3)], dht, start=True, **options)
                # the failed one took none of the first one's handlers with it
                with DecentralizedAverager([torch.ones(3)], other, start=True, **options) as peer:
                    steps = [first.step(wait=False, timeout=30), peer.step(wait=False, timeout=30)]
                    assert all(len(step.result()) == 2 for step in steps)
                with first.get_tensors() as (tensor,):
                    assert torch.allclose(tensor, torch.full((3,), 0.5))
            finally:
                first.shutdown()
