"""Expert requests are counted on the wire before protobuf parses them: more tensors than the expert takes (millions
of empty ones fit in a 4 MiB message) are refused without materialising them."""

import pytest
import torch
from moe_hostile_helpers import (
    UID,
    as_stream,
    attacker,
    chunked,
    drain,
    good_forward,
    hostile_server,
    make_backends,
    make_request,
    peak_rss,
)

from hivemind.compression import serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.request_scan import CheckedExpertRequest, RequestScanError, scan_expert_request
from hivemind.moe.wire_scan import MAX_TENSOR_DIMS
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.p2p.framing import EncodedMessage
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import runtime_pb2

__all__ = ["attacker", "hostile_server"]  # the fixtures, used by the tests below

COUNTS = {"ffn.0": 1, "ffn.1": 2}
EMPTY_TENSORS = 2_000_000  # two bytes each on the wire: the request stays under the 4 MiB message limit


def many_empty_tensors(uid: str = UID) -> EncodedMessage:
    return EncodedMessage([runtime_pb2.ExpertRequest(uid=uid).SerializeToString(), b"\x12\x00" * EMPTY_TENSORS])


def checked_parse(data: bytes, counts=COUNTS) -> runtime_pb2.ExpertRequest:
    request = CheckedExpertRequest(counts, "forward")
    request.ParseFromString(data)
    return request.message


@pytest.mark.parametrize(
    "message",
    [
        runtime_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_torch_tensor(torch.randn(4, 3, 2))]),
        runtime_pb2.ExpertRequest(uid="ffn.1", tensors=[serialize_torch_tensor(torch.randn(4, 3))] * 2, metadata=b"m"),
        runtime_pb2.ExpertRequest(uid="ffn.0", tensors=[runtime_pb2.Tensor(size=list(range(1, MAX_TENSOR_DIMS + 1)))]),
        runtime_pb2.ExpertRequest(uid="elsewhere.7"),  # unknown uids are refused later, with the usual message
        chunked(torch.randn(64, 64), uid="ffn.0")[0],
    ],
    ids=["one-tensor", "two-tensors-and-metadata", "max-dims", "no-tensors", "stream-chunk"],
)
def test_valid_request_parses_as_protobuf_does(message):
    assert checked_parse(message.SerializeToString()) == message


def test_more_tensors_than_the_expert_takes_are_refused():
    two = runtime_pb2.ExpertRequest(uid="ffn.0", tensors=[runtime_pb2.Tensor()] * 2).SerializeToString()
    with pytest.raises(RequestScanError, match="forward of ffn.0 expects 1 tensors, got more"):
        checked_parse(two)
    assert len(checked_parse(two.replace(b"ffn.0", b"ffn.1")).tensors) == 2


def test_tensors_before_the_uid_are_bounded_by_the_largest_hosted_count():
    tensors_first = b"\x12\x00" * 3 + runtime_pb2.ExpertRequest(uid="ffn.1").SerializeToString()
    with pytest.raises(RequestScanError, match="expects 2 tensors, got more"):
        checked_parse(tensors_first)


@pytest.mark.parametrize(
    "data, message",
    [
        (runtime_pb2.Tensor(size=[1] * (MAX_TENSOR_DIMS + 1)).SerializeToString(), "dimensions"),
        (b"\x10\x01" * (MAX_TENSOR_DIMS + 1), "dimensions"),  # the shape unpacked: one field per dimension
        (b"\x78\x00" * 100, "fields"),  # unknown fields
    ],
    ids=["packed-shape", "unpacked-shape", "unknown-fields"],
)
def test_bloated_tensor_is_refused(data, message):
    request = b"\x0a\x05ffn.0\x12" + bytes([len(data)]) + data if len(data) < 128 else None
    if request is None:
        request = b"\x0a\x05ffn.0\x12" + bytes([len(data) & 0x7F | 0x80, len(data) >> 7]) + data
    with pytest.raises(RequestScanError, match=message):
        checked_parse(request)


@pytest.mark.parametrize(
    "data", [b"\x12\x05\x01", b"\x0b\x0c", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"], ids=str
)
def test_malformed_request_is_refused(data):
    with pytest.raises(RequestScanError, match="not a valid expert message"):
        checked_parse(data)


def test_endless_unknown_fields_are_refused():
    with pytest.raises(RequestScanError, match="fields besides its tensors"):
        scan_expert_request(b"\x18\x01" * EMPTY_TENSORS, COUNTS, "forward")


@pytest.mark.timeout(60)
async def test_unary_request_of_millions_of_empty_tensors_is_refused_before_parsing(hostile_server, attacker):
    client, stub = attacker
    payload = b"".join(many_empty_tensors().parts)  # sent as it is (a protobuf object would take ~150 MiB here)
    handle = get_handle_name(None, "ConnectionHandler", "rpc_forward")
    before = peak_rss()
    with pytest.raises(P2PHandlerError, match="expects 1 tensors, got more"):
        await client._client.call_unary_handler(hostile_server.dht.peer_id, handle, payload)
    growth = peak_rss() - before
    assert growth < 64 * 1024**2, f"the server's memory peaked {growth / 2**20:.0f} MiB higher"
    await good_forward(stub)


@pytest.mark.timeout(60)
async def test_stream_message_of_millions_of_empty_tensors_is_refused_before_parsing(attacker):
    _, stub = attacker
    before = peak_rss()
    with pytest.raises(P2PHandlerError, match="expects 2 tensors, got more"):  # backward: input and output grad
        await drain(await stub.rpc_backward_stream(as_stream([many_empty_tensors()])))
    growth = peak_rss() - before
    assert growth < 64 * 1024**2, f"the server's memory peaked {growth / 2**20:.0f} MiB higher"
    await good_forward(stub)


class EchoingHandler(ConnectionHandler):
    """A subclass with its own rpc_forward (as downstream projects have): its requests follow its own rules."""

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, _context) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=request.tensors)


@pytest.mark.timeout(60)
async def test_rpc_overridden_by_a_subclass_gets_its_requests_unchecked():
    dht = DHT(start=True)
    handler = EchoingHandler(dht, make_backends([UID]))
    handler.run_in_thread(await_ready=True, timeout=30)
    client = await P2P.create(initial_peers=[str(maddr) for maddr in dht.get_visible_maddrs()])
    try:
        stub = EchoingHandler.get_stub(client, dht.peer_id)
        request = make_request(UID, *(torch.randn(2, 3) for _ in range(3)))  # the expert itself takes 1 tensor
        assert list((await stub.rpc_forward(request, timeout=30)).tensors) == list(request.tensors)
        with pytest.raises(P2PHandlerError, match="expects 2 tensors, got more"):  # the inherited RPCs are checked
            await stub.rpc_backward(request, timeout=30)
    finally:
        await client.shutdown()
        handler.shutdown()
        dht.shutdown()
