"""A ConnectionHandler subclass written the way petals 2.2.0 writes TransformerConnectionHandler, served from real
daemons: keyword-only constructor arguments passed on top of ConnectionHandler's, add_p2p_handlers extended to start a
listener task before any request is accepted, its own rpc_* handlers (a unary push that calls the next server through
``self.get_stub(self._p2p, peer)``, a streamed forward that gathers its input with amap_in_executor and
deserialize_tensor_stream and answers in parts of split_for_streaming), rpc_info overridden, and shutdown() rewritten
on top of ``_outer_pipe`` and ``shutdown_timeout``."""

import asyncio
import multiprocessing as mp
from typing import AsyncIterator, Dict

import pytest
import torch

from hivemind import (
    DHT,
    MSGPackSerializer,
    P2PContext,
    PeerID,
    deserialize_tensor_stream,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import amap_in_executor, anext, iter_as_aiter
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

CHUNK_BYTES = 64  # small stream parts, so that the streamed forward gets and sends several messages per tensor


class PetalsLikeHandler(ConnectionHandler):
    module_backends: Dict[str, ModuleBackend]

    def __init__(self, dht: DHT, module_backends: Dict[str, ModuleBackend], *, handler_index: int, events: mp.Queue):
        super().__init__(dht, module_backends)
        self._handler_index, self._events = handler_index, events
        self._listener_task = None

    async def add_p2p_handlers(self, *args, **kwargs) -> None:
        if self._listener_task is None:
            self._listener_task = asyncio.create_task(self._listen())
        await super().add_p2p_handlers(*args, **kwargs)

    async def _listen(self) -> None:
        self._events.put(("listening", self._handler_index))
        await asyncio.Event().wait()

    def shutdown(self):
        """petals' handler stops its process the same way: ask it through the pipe, then terminate it if it lingers"""
        if not self.is_alive():
            return
        self._outer_pipe.send("_shutdown")
        self.join(self.shutdown_timeout)
        if self.is_alive():
            self.terminate()

    async def rpc_info(self, request: runtime_pb2.ExpertUID, ctx: P2PContext) -> runtime_pb2.ExpertInfo:
        backend = self.module_backends[request.uid] if request.uid else next(iter(self.module_backends.values()))
        info = dict(
            backend.get_info(),
            listening=self._listener_task is not None,
            dht_client_mode=self.dht.client_mode,
            local_id=ctx.local_id.to_base58(),
        )
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, _ctx: P2PContext) -> runtime_pb2.ExpertResponse:
        metadata = MSGPackSerializer.loads(request.metadata)
        tensors = [deserialize_torch_tensor(tensor) for tensor in request.tensors]
        total = sum(tensors)
        if metadata.get("next_peer"):  # push on to the next server, as petals' _push_outputs does
            stub = self.get_stub(self._p2p, PeerID.from_base58(metadata["next_peer"]))
            next_request = runtime_pb2.ExpertRequest(
                uid=request.uid, tensors=[serialize_torch_tensor(total)], metadata=MSGPackSerializer.dumps({})
            )
            response = await stub.rpc_push(next_request, timeout=10)
            total = deserialize_torch_tensor(response.tensors[0]) * 10
        return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(total)])

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], _ctx: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """petals' interactive session: one answer per step, each depending on the earlier steps, until a step
        without tensors ends the session"""
        request = await asyncio.wait_for(anext(requests), 10)
        max_length = MSGPackSerializer.loads(request.metadata)["max_length"]
        cache, length = torch.zeros(8), 0
        while request.tensors:
            x = deserialize_torch_tensor(request.tensors[0])
            length += x.shape[0]
            if length > max_length:
                raise ValueError(f"the session is over {max_length} tokens")
            with torch.no_grad():
                cache += self.module_backends[request.uid].module(x).sum(0)
            yield runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(cache.clone())])
            request = await asyncio.wait_for(anext(requests), 10)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], _ctx: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        uid = None

        def _unpack(request: runtime_pb2.ExpertRequest):
            nonlocal uid
            uid = uid or request.uid
            return request.tensors

        inputs = await deserialize_tensor_stream(amap_in_executor(_unpack, requests))
        with torch.no_grad():
            outputs = self.module_backends[uid].module(*inputs)
        for part in split_for_streaming(serialize_torch_tensor(outputs), CHUNK_BYTES):
            yield runtime_pb2.ExpertResponse(tensors=[part])


def _backends() -> Dict[str, ModuleBackend]:
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 8)
    backend = ModuleBackend(
        "block.0",
        module,
        args_schema=(BatchTensorDescriptor(8),),
        outputs_schema=BatchTensorDescriptor(8),
        max_batch_size=16,
    )
    return {"block.0": backend}


@pytest.mark.timeout(90)
def test_a_petals_like_connection_handler_serves_its_own_rpcs():
    events = mp.Queue()
    first_dht = DHT(start=True)
    second_dht = DHT(initial_peers=first_dht.get_visible_maddrs(), start=True)
    backends = _backends()
    handlers = [
        PetalsLikeHandler(dht, backends, handler_index=index, events=events)
        for index, dht in enumerate([first_dht, first_dht, second_dht])
    ]
    try:
        for handler in handlers:
            handler.run_in_background()
        assert sorted(events.get(timeout=10)[1] for _ in handlers) == [0, 1, 2]

        async def client_calls():
            p2p = await P2P.create(initial_peers=first_dht.get_visible_maddrs())
            try:
                stub = PetalsLikeHandler.get_stub(p2p, first_dht.peer_id)
                infos = [
                    MSGPackSerializer.loads((await stub.rpc_info(runtime_pb2.ExpertUID(uid=uid))).serialized_info)
                    for uid in ("block.0", "", "block.0")
                ]
                x = torch.randn(3, 8)
                pushed = await stub.rpc_push(
                    runtime_pb2.ExpertRequest(
                        uid="block.0",
                        tensors=[serialize_torch_tensor(x + i) for i in range(3)],  # more tensors than the schema has
                        metadata=MSGPackSerializer.dumps({"next_peer": second_dht.peer_id.to_base58()}),
                    )
                )
                parts = (
                    runtime_pb2.ExpertRequest(uid="block.0", tensors=[part])
                    for part in split_for_streaming(serialize_torch_tensor(x), CHUNK_BYTES)
                )
                outputs = await asyncio.wait_for(stub.rpc_forward_stream(iter_as_aiter(parts)), 10)
                forward = await deserialize_tensor_stream(message.tensors async for message in outputs)
                return infos, x, deserialize_torch_tensor(pushed.tensors[0]), forward
            finally:
                await p2p.shutdown()

        infos, x, pushed, forward = asyncio.run(client_calls())
        for info in infos:
            assert info["listening"] is True and info["dht_client_mode"] is False
            assert info["local_id"] == first_dht.peer_id.to_base58()
            assert "forward_schema" in info and "outputs_schema" in info
        assert torch.allclose(pushed, (3 * x + 3) * 10)
        with torch.no_grad():
            assert len(forward) == 1 and torch.allclose(forward[0], backends["block.0"].module(x))
    finally:
        for handler in handlers:
            handler.shutdown()
        second_dht.shutdown()
        first_dht.shutdown()
    assert not any(handler.is_alive() for handler in handlers)


@pytest.mark.timeout(90)
def test_a_petals_like_inference_session_steps_through_one_stream():
    """The client side as petals' _ServerInferenceSession runs it: the p2p replica and every call made through
    RemoteExpertWorker.run_coroutine from synchronous code, the request stream fed from a queue one step at a time
    while the response stream of the same call is read, and an empty request to end the session."""
    dht = DHT(start=True)
    backends = _backends()
    handler = PetalsLikeHandler(dht, backends, handler_index=0, events=mp.Queue())
    handler.run_in_background()
    client_dht = DHT(initial_peers=dht.get_visible_maddrs(), client_mode=True, start=True)
    try:
        p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
        stub = PetalsLikeHandler.get_stub(p2p, dht.peer_id)
        inputs_queue = asyncio.Queue()

        async def read_inputs_from_queue():
            while True:
                message = await inputs_queue.get()
                yield message
                if not message.uid and not message.tensors:
                    break

        async def open_session():
            return await asyncio.wait_for(stub.rpc_inference(read_inputs_from_queue()), 10)

        async def step(request):
            await inputs_queue.put(request)
            return await asyncio.wait_for(anext(outputs_stream), 10)

        async def close_session():
            await inputs_queue.put(runtime_pb2.ExpertRequest())
            try:
                await anext(outputs_stream)
            except StopAsyncIteration:
                return True
            return False

        outputs_stream = RemoteExpertWorker.run_coroutine(open_session())
        metadata = MSGPackSerializer.dumps({"max_length": 10, "session_id": "s"})
        expected = torch.zeros(8)
        for step_index in range(4):
            x = torch.randn(2, 8)
            request = runtime_pb2.ExpertRequest(uid="block.0", tensors=[serialize_torch_tensor(x)], metadata=metadata)
            response = RemoteExpertWorker.run_coroutine(step(request))
            with torch.no_grad():
                expected += backends["block.0"].module(x).sum(0)
            assert torch.allclose(deserialize_torch_tensor(response.tensors[0]), expected, atol=1e-5), step_index
        assert RemoteExpertWorker.run_coroutine(close_session()) is True
        RemoteExpertWorker.run_coroutine(p2p.shutdown())
    finally:
        handler.shutdown()
        client_dht.shutdown()
        dht.shutdown()
