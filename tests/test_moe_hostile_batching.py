"""A request that passes the schema checks but fails the expert's computation (an out-of-range index of a custom
embedding expert) must not fail the good requests batched with it."""

import asyncio

import pytest
import torch
from moe_hostile_helpers import HIDDEN, connect_attacker, make_request

from hivemind.compression import deserialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.p2p import P2PHandlerError
from hivemind.utils.tensor_descr import BatchTensorDescriptor

VOCABULARY = 10


class EmbeddingExpert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCABULARY, HIDDEN)

    def forward(self, ids):
        return self.embedding(ids).sum(1)


@pytest.mark.timeout(60)
async def test_failing_request_is_retried_apart_from_the_good_ones_in_its_batch():
    module = EmbeddingExpert()
    backend = ModuleBackend(
        "embedding.0",
        module,
        args_schema=(BatchTensorDescriptor(1, dtype=torch.int64),),
        outputs_schema=BatchTensorDescriptor(HIDDEN),
        max_batch_size=64,
        min_batch_size=4,  # the three requests below (4 examples) form one batch
    )
    server = Server(DHT(start=True), {"embedding.0": backend}, update_period=30, start=True)
    client, stub = await connect_attacker(server)
    try:
        good, bad = [torch.tensor([[1]]), torch.tensor([[2], [3]])], torch.tensor([[VOCABULARY + 5]])
        calls = [stub.rpc_forward(make_request("embedding.0", ids), timeout=30) for ids in (good[0], bad, good[1])]
        first, refused, second = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(refused, P2PHandlerError) and "index out of range" in str(refused)
        for ids, response in zip(good, (first, second)):
            assert not isinstance(response, BaseException), response
            (output,) = [deserialize_torch_tensor(tensor) for tensor in response.tensors]
            assert torch.allclose(output, module(ids).detach(), atol=1e-6)
    finally:
        await client.shutdown()
        server.shutdown()
