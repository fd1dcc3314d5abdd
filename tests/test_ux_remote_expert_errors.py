"""A RemoteExpert pointed at a peer that serves no experts, or one its DHT cannot reach, fails with an error that
names the expert and the peer and says what is likely wrong (still a P2PDaemonError, as before)."""

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.client.expert import create_remote_experts
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import P2PDaemonError


@pytest.mark.timeout(60)
def test_remote_expert_at_a_peer_without_a_server_or_out_of_reach():
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as client_dht:
        with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=client_dht.get_visible_maddrs()) \
                as no_server, DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as elsewhere:  # fmt: skip
            peers = [no_server.peer_id, elsewhere.peer_id]
            experts = create_remote_experts([ExpertInfo("ffn.0.0", peer) for peer in peers], client_dht)
            # they said only "p2pd error: failed to negotiate protocol: protocols not supported: [Connection...]"
            # and "p2pd error: failed to find any peer in table"
            hints = ["that peer serves no experts", "this DHT does not know how to reach that peer"]
            for expert, peer, hint in zip(experts, peers, hints):
                with pytest.raises(P2PDaemonError) as error_info:
                    expert(torch.randn(2, 16))
                message = str(error_info.value)
                assert f"expert 'ffn.0.0' from {peer}" in message and hint in message, message


@pytest.mark.timeout(60)
def test_forward_and_backward_of_an_expert_whose_server_died_name_the_expert_and_the_call():
    import torch.nn as nn
    from moe_client_fakes import FakeExpertServer

    from hivemind.moe.server.dht_handler import get_experts

    server = FakeExpertServer({"ffn.0": nn.Linear(4, 4)}, 4)
    with DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
        (expert,) = get_experts(dht, ["ffn.0"])
        inputs = torch.randn(3, 4, requires_grad=True)
        outputs, peer = expert(inputs), server.dht.peer_id
        server.stop()
        # they said only "p2pd error: failed to dial: failed to dial 12D3KooW...: all dials failed ... refused"
        for call, method in ((lambda: outputs.sum().backward(), "backward"), (lambda: expert(inputs), "forward")):
            with pytest.raises(P2PDaemonError) as error_info:
                call()
            message = str(error_info.value)
            assert f"{method} of expert 'ffn.0' at {peer}" in message and "dial" in message, message
