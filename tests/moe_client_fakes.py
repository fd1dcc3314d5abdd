"""A tiny in-process expert server speaking the expert RPCs, for client tests (with switches for faults).

It runs on the RemoteExpertWorker loop of the test process, with its own DHT (and so its own p2pd), so that the
client under test reaches it through real daemons. ``FakeExpertServer.stop()`` kills its daemon, like a crashed
server.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from hivemind.compression import deserialize_tensor_stream, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.client import expert_rpc
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.dht_handler import declare_experts
from hivemind.moe.server.module_backend import InvalidInputsError
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor


def expert_info(hidden_dim: int, compression: int = runtime_pb2.CompressionType.NONE) -> dict:
    descriptor = BatchTensorDescriptor(hidden_dim, dtype=torch.float32, compression=compression)
    return dict(forward_schema=((descriptor,), {}), outputs_schema=descriptor, keyword_names=())


class ConnectionHandler(expert_rpc.ConnectionHandler):
    """Serves ``modules`` (uid -> nn.Module of one [batch, hidden] input and output); faults set per uid."""

    def __init__(self, modules: Dict[str, nn.Module], hidden_dim: int):
        self.modules, self.info = modules, expert_info(hidden_dim)
        self.delays: Dict[str, float] = {}  # uid -> seconds to sleep before answering forward
        self.info_delays: Dict[str, float] = {}  # uid -> seconds to sleep before answering rpc_info
        self.failing: set = set()  # uids whose forward raises
        self.refusing: set = set()  # uids whose forward claims that every request is invalid (InvalidInputsError)
        self.nan_outputs: set = set()  # uids whose forward returns NaN
        self.oversized: set = set()  # uids whose forward answers with far too many rows
        self.calls: Dict[str, List[int]] = {}  # "method:uid" -> batch sizes seen

    def reset_faults(self) -> None:
        """Forget injected faults and recorded calls (between tests sharing one server)."""
        self.delays.clear(), self.failing.clear(), self.nan_outputs.clear(), self.oversized.clear(), self.calls.clear()
        self.refusing.clear()
        self.info_delays.clear()

    def _module(self, uid: str) -> nn.Module:
        if uid not in self.modules:
            raise KeyError(f"unknown expert {uid}")
        return self.modules[uid]

    async def rpc_info(self, message: runtime_pb2.ExpertUID, _: P2PContext) -> runtime_pb2.ExpertInfo:
        self._module(message.uid)
        self.calls.setdefault(f"info:{message.uid}", []).append(0)
        if message.uid in self.info_delays:
            await asyncio.sleep(self.info_delays[message.uid])
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(self.info))

    async def _forward(self, uid: str, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        self.calls.setdefault(f"forward:{uid}", []).append(len(inputs[0]))
        if uid in self.delays:
            await asyncio.sleep(self.delays[uid])
        if uid in self.failing:
            raise RuntimeError(f"expert {uid} is broken")
        if uid in self.refusing:
            raise InvalidInputsError(f"{uid}: input #0 has shape {list(inputs[0].shape)}, which it does not take")
        with torch.no_grad():
            output = self._module(uid)(*inputs)
        if uid in self.nan_outputs:
            output = torch.full_like(output, float("nan"))
        if uid in self.oversized:
            extra_rows = 2 * len(output) + 2**20 // (4 * output.shape[1]) + 1  # 2x the answer and 1 MiB more
            output = torch.cat([output, output.new_zeros(extra_rows, output.shape[1])])
        return [output]

    async def _backward(self, uid: str, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        self.calls.setdefault(f"backward:{uid}", []).append(len(tensors[0]))
        if uid in self.failing:
            raise RuntimeError(f"expert {uid} is broken")
        inputs, grad_output = tensors[0].requires_grad_(True), tensors[1]
        with torch.enable_grad():
            output = self._module(uid)(inputs)
            (grad_input,) = torch.autograd.grad(output, inputs, grad_output)
        return [grad_input]

    async def rpc_forward(self, call: runtime_pb2.ExpertRequest, _: P2PContext) -> runtime_pb2.ExpertResponse:
        outputs = await self._forward(call.uid, [deserialize_torch_tensor(t) for t in call.tensors])
        return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(t) for t in outputs])

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        grads = await self._backward(request.uid, [deserialize_torch_tensor(t) for t in request.tensors])
        return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(t) for t in grads])

    async def _read_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        uids = []

        async def chunks():
            async for request in requests:
                uids.append(request.uid)
                yield request.tensors

        tensors = await deserialize_tensor_stream(chunks())
        self.calls.setdefault(f"stream:{uids[0]}", []).append(len(tensors[0]))
        return uids[0], tensors

    @staticmethod
    def _responses(tensors: Iterable[torch.Tensor]):
        for tensor in tensors:
            for chunk in split_for_streaming(serialize_torch_tensor(tensor), expert_rpc.STREAMING_CHUNK_SIZE):
                yield runtime_pb2.ExpertResponse(tensors=[chunk])

    async def rpc_forward_stream(
        self, calls: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        uid, tensors = await self._read_stream(calls)
        for response in self._responses(await self._forward(uid, tensors)):
            yield response

    async def rpc_backward_stream(
        self, calls: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        uid, tensors = await self._read_stream(calls)
        for response in self._responses(await self._backward(uid, tensors)):
            yield response


class FakeExpertServer:
    """An expert server in this process: its own DHT (bootstrapped from ``initial_peers``) and handler."""

    def __init__(self, modules: Dict[str, nn.Module], hidden_dim: int, initial_peers=None, expiration: float = 60):
        self.dht = DHT(start=True, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        self.handler = ConnectionHandler(modules, hidden_dim)
        self.p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        RemoteExpertWorker.run_coroutine(self.handler.add_p2p_handlers(self.p2p))
        self.declare(expiration)

    def declare(self, expiration: float = 60, uids: Optional[List[str]] = None) -> None:
        declare_experts(self.dht, uids or list(self.handler.modules), get_dht_time() + expiration)

    def stop(self) -> None:
        """Stop answering at once (the daemon goes away, as when the server process is killed)."""
        self.dht.shutdown()
