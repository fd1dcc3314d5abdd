"""A ConnectionHandler subclass's own streamed RPCs (petals' rpc_inference: each step of a session is one message with
all of its hidden states, not split into chunks) take the messages that any p2p stream handler takes; only the
expert RPCs of ConnectionHandler itself, whose clients send STREAM_CHUNK_SIZE_BYTES parts, keep the tighter limit."""

import asyncio
from typing import AsyncIterator, Dict

import pytest
import torch

from hivemind import DHT, P2PContext, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.moe.server.connection_handler import MAX_STREAM_MESSAGE_BYTES, ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import anext, iter_as_aiter
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 1024
# a prefill step of a session: 1 x 1536 tokens x 1024 float32 = 6 MiB in one message (as petals' client sends it)
PREFILL_TOKENS = 1536


class SessionHandler(ConnectionHandler):
    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], _ctx: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for request in requests:
            if not request.tensors:
                return
            hidden_states = deserialize_torch_tensor(request.tensors[0])
            yield runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(hidden_states.sum(dim=1))])


def _backends() -> Dict[str, ModuleBackend]:
    module = torch.nn.Linear(HIDDEN, HIDDEN)
    schema = BatchTensorDescriptor(HIDDEN)
    return {
        "block.0": ModuleBackend("block.0", module, args_schema=(schema,), outputs_schema=schema, max_batch_size=4)
    }


@pytest.mark.timeout(120)
def test_a_subclass_stream_rpc_takes_a_message_over_the_expert_chunk_size():
    dht = DHT(start=True)
    handler = SessionHandler(dht, _backends())
    handler.run_in_background()
    try:
        prefill = torch.randn(1, PREFILL_TOKENS, HIDDEN)
        assert prefill.numel() * prefill.element_size() > MAX_STREAM_MESSAGE_BYTES

        async def session():
            p2p = await P2P.create(initial_peers=dht.get_visible_maddrs())
            try:
                stub = SessionHandler.get_stub(p2p, dht.peer_id)
                steps = [
                    runtime_pb2.ExpertRequest(uid="block.0", tensors=[serialize_torch_tensor(prefill)]),
                    runtime_pb2.ExpertRequest(uid="block.0", tensors=[serialize_torch_tensor(prefill[:, :1])]),
                    runtime_pb2.ExpertRequest(),
                ]
                responses = await asyncio.wait_for(stub.rpc_inference(iter_as_aiter(steps)), 30)
                first = await asyncio.wait_for(anext(responses), 30)
                second = await asyncio.wait_for(anext(responses), 30)
                return deserialize_torch_tensor(first.tensors[0]), deserialize_torch_tensor(second.tensors[0])
            finally:
                await p2p.shutdown()

        first, second = asyncio.run(session())
        assert torch.allclose(first, prefill.sum(dim=1), atol=1e-3)
        assert torch.allclose(second, prefill[:, 0])
    finally:
        handler.shutdown()
        dht.shutdown()


@pytest.mark.timeout(120)
def test_the_expert_stream_rpcs_still_refuse_a_message_over_the_chunk_size():
    dht = DHT(start=True)
    handler = SessionHandler(dht, _backends())
    handler.run_in_background()
    try:

        async def oversized_forward_stream():
            p2p = await P2P.create(initial_peers=dht.get_visible_maddrs())
            try:
                stub = SessionHandler.get_stub(p2p, dht.peer_id)
                inputs = torch.randn(4, HIDDEN * 2048)  # one message of 32 MiB, not split into chunks
                request = runtime_pb2.ExpertRequest(uid="block.0", tensors=[serialize_torch_tensor(inputs)])
                responses = await asyncio.wait_for(stub.rpc_forward_stream(iter_as_aiter([request])), 30)
                return [response async for response in responses]
            finally:
                await p2p.shutdown()

        with pytest.raises(P2PHandlerError):
            asyncio.run(oversized_forward_stream())
    finally:
        handler.shutdown()
        dht.shutdown()
