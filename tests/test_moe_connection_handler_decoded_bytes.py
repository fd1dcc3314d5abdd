"""The bytes a handler holds for a request are at least its decoded tensors: a request of 8-bit quantized tensors
decodes to four times its wire bytes, and only the wire bytes were counted against the handler's limits, so that a
caller (or all callers) could keep four times its limit of decoded tensors waiting in the task pools."""

import asyncio
import time

import pytest
import torch
from moe_hostile_helpers import connect_attacker

from hivemind.compression import serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.server.expert_requests import RequestBytesInFlight
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN, ROWS = 1024, 256
DECODED_BYTES = ROWS * HIDDEN * 4  # 1 MiB of float32; about 256 KiB on the wire as UNIFORM_8BIT


class SlowLinear(torch.nn.Linear):
    def forward(self, inputs):
        time.sleep(1.0)  # keeps the requests that follow waiting in the pool
        return super().forward(inputs)


@pytest.mark.timeout(60)
async def test_compressed_requests_count_their_decoded_bytes(monkeypatch):
    schema = BatchTensorDescriptor(HIDDEN, dtype=torch.float32)
    backend = ModuleBackend(
        "expert.0", SlowLinear(HIDDEN, HIDDEN), args_schema=(schema,), outputs_schema=schema, max_batch_size=ROWS
    )
    server = Server(DHT(start=True), {"expert.0": backend}, update_period=30, start=True)
    (handler,) = server.conn_handlers
    answer = handler._get_schemas()["expert.0"].answer_bytes(ROWS, backward=False)  # held until the answer is sent
    # two calls fit when their decoded tensors count; all four would if only their wire bytes did
    budget = RequestBytesInFlight(total=2**30, per_peer=int(2.75 * (DECODED_BYTES + answer)))
    monkeypatch.setattr(handler, "_bytes_in_flight", budget)
    client, stub = await connect_attacker(server)
    try:
        tensor = serialize_torch_tensor(torch.randn(ROWS, HIDDEN), runtime_pb2.CompressionType.UNIFORM_8BIT)
        assert len(tensor.buffer) < DECODED_BYTES / 3
        request = runtime_pb2.ExpertRequest(uid="expert.0", tensors=[tensor])
        calls = [stub.rpc_forward(request, timeout=30) for _ in range(4)]  # 4 MiB decoded, 1 MiB on the wire
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [result for result in results if isinstance(result, P2PHandlerError)]
        assert refused and all("your requests in progress on this server would hold over" in str(e) for e in refused)
        assert len(results) - len(refused) >= 2, results
    finally:
        await client.shutdown()
        server.shutdown()
