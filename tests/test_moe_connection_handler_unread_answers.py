"""An answer that its caller does not read stays in the server's memory until the write gives up (a minute or two),
so it counts toward the request bytes that caller holds: a caller that sends small requests to an expert with large
outputs and never reads the answers is refused once they would hold more than its share, instead of piling up
gigabytes of answers (150 such calls of 4 KiB each held 1.4 GiB of answers before)."""

import pytest
import torch
from async_wait import wait_until
from moe_hostile_helpers import as_stream, drain, make_request

from hivemind.dht import DHT
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.expert_requests import RequestBytesInFlight
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.utils.tensor_descr import BatchTensorDescriptor

pytestmark = pytest.mark.timeout(90)

UID, INPUTS, OUTPUTS, ROWS = "wide.0", 16, 2**16, 64  # 4 KiB of inputs, 16 MiB of outputs per call
ANSWER_BYTES = ROWS * OUTPUTS * 4


@pytest.fixture(scope="module")
def wide_server():
    """A server whose expert widens its inputs 4096 times (as an embedding or an output layer may)."""
    module = torch.nn.Linear(INPUTS, OUTPUTS)
    backend = ModuleBackend(
        UID,
        module,
        args_schema=(BatchTensorDescriptor(INPUTS),),
        outputs_schema=BatchTensorDescriptor(OUTPUTS),
        max_batch_size=ROWS,
    )
    server = Server(DHT(start=True), {UID: backend}, start=True)
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
async def caller(wide_server):
    client = await P2P.create(initial_peers=[str(maddr) for maddr in wide_server.dht.get_visible_maddrs()])
    try:
        yield client, ConnectionHandler.get_stub(client, wide_server.dht.peer_id)
    finally:
        await client.shutdown()


async def call_and_never_read(client: P2P, server: Server):
    """Send a whole forward request and end the input, but never read the answer; returns the stream's writer."""
    handle = f"{ConnectionHandler.__name__}.rpc_forward_stream"
    _, _, writer = await client.call_binary_stream_handler(server.dht.peer_id, handle)
    await P2P.send_protobuf(make_request(UID, torch.randn(ROWS, INPUTS)), writer)
    await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
    return writer


async def test_answers_a_caller_does_not_read_count_toward_its_bytes_in_flight(wide_server, caller, monkeypatch):
    client, stub = caller
    (handler,) = wide_server.conn_handlers
    budget = RequestBytesInFlight(total=2**34, per_peer=int(2.5 * ANSWER_BYTES))  # room for two unread answers
    monkeypatch.setattr(handler, "_bytes_in_flight", budget)
    unread = [await call_and_never_read(client, wide_server) for _ in range(2)]
    try:
        # (before, each answer's bytes were given back once computed, while the answer waited for its reader)
        await wait_until(lambda: budget.used >= 2 * ANSWER_BYTES, "both unread answers to be held for the caller")
        with pytest.raises(P2PHandlerError, match="your requests in progress on this server would hold over"):
            await drain(await stub.rpc_forward_stream(as_stream([make_request(UID, torch.randn(ROWS, INPUTS))])))
    finally:
        for writer in unread:
            writer.close()
    await wait_until(lambda: budget.used == 0, "the bytes of the abandoned answers to be given back", timeout=30)
    await drain(await stub.rpc_forward_stream(as_stream([make_request(UID, torch.randn(ROWS, INPUTS))])))
