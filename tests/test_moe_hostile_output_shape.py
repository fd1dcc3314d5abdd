"""RemoteExpert checks the outputs of a hostile (or broken) server against the expert's outputs_schema and
the batch it sent, as RemoteMixtureOfExperts does: an output with one row for a batch of eight would broadcast
silently in the caller's arithmetic."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.expert_rpc import MalformedExpertResponse
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo

HID = 8


@pytest.fixture(scope="module")
def one_row_server():
    """A fake server of expert.0 whose forward answers with the first row of the right output only."""
    server = FakeExpertServer({"expert.0": nn.Linear(HID, HID)}, HID)
    honest_forward = server.handler._forward

    async def first_row_only(uid, inputs):
        return [output[:1] for output in await honest_forward(uid, inputs)]

    server.handler._forward = first_row_only
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield server, client_dht
    finally:
        client_dht.shutdown()
        server.stop()


def test_an_output_with_fewer_rows_than_the_batch_is_malformed(one_row_server):
    server, client_dht = one_row_server
    p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
    expert = RemoteExpert(ExpertInfo("expert.0", server.dht.peer_id), p2p)
    with pytest.raises(MalformedExpertResponse, match=r"output of shape \(1, 8\) instead of \(8, 8\)"):
        expert(torch.randn(8, HID))
