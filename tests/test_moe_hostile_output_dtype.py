"""RemoteExpert refuses outputs whose dtype is not the one the expert's outputs_schema promises, as it refuses outputs
of the wrong shape: an integer or bool answer was returned as it was, an output that autograd cannot differentiate
(the expert then silently got no gradient from a loss that also had other terms), and a float16 answer to a float32
schema silently lost precision."""

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
def retyping_server():
    """(fake server of expert.0 whose forward casts its honest output to ``server.answer_dtype``, client DHT)."""
    server = FakeExpertServer({"expert.0": nn.Linear(HID, HID)}, HID)
    server.answer_dtype = torch.float32
    honest_forward = server.handler._forward

    async def retyped(uid, inputs):
        return [output.to(server.answer_dtype) for output in await honest_forward(uid, inputs)]

    server.handler._forward = retyped
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield server, client_dht
    finally:
        client_dht.shutdown()
        server.stop()


def remote_expert(server, client_dht) -> RemoteExpert:
    p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
    return RemoteExpert(ExpertInfo("expert.0", server.dht.peer_id), p2p)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float16, torch.complex64])
def test_an_output_of_another_dtype_than_the_schema_is_malformed(retyping_server, dtype):
    server, client_dht = retyping_server
    server.answer_dtype = dtype
    expert = remote_expert(server, client_dht)
    with pytest.raises(MalformedExpertResponse, match=rf"output of dtype {dtype} instead of torch.float32"):
        expert(torch.randn(4, HID, requires_grad=True))


@pytest.mark.timeout(60)
def test_an_output_of_the_schema_dtype_is_differentiable(retyping_server):
    server, client_dht = retyping_server
    server.answer_dtype = torch.float32
    inputs = torch.randn(4, HID, requires_grad=True)
    output = remote_expert(server, client_dht)(inputs)
    assert output.dtype == torch.float32 and output.requires_grad
    output.sum().backward()
    assert inputs.grad is not None and inputs.grad.shape == inputs.shape
