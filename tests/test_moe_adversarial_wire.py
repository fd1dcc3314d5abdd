"""Hand-made wire bytes sent to a real expert Server as a hostile client would: each is refused with a clear
P2PHandlerError, other clients keep being served, and legitimate requests (compressed tensors too) still pass."""

import asyncio
import time

import pytest
import torch
from moe_hostile_helpers import (
    HIDDEN,
    UID,
    as_stream,
    attacker,
    drain,
    good_forward,
    hostile_server,
    make_request,
)

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.moe.server.request_scan import scan_expert_request
from hivemind.moe.wire_scan import MAX_FIELDS_PER_TENSOR, MAX_OTHER_FIELDS
from hivemind.p2p import P2PHandlerError
from hivemind.p2p.framing import EncodedMessage
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

__all__ = ["attacker", "hostile_server"]  # the fixtures, used by the tests below


def key(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def field(number: int, payload: bytes) -> bytes:
    return key(number, 2) + encode_varint(len(payload)) + payload


UID_FIELD = field(1, UID.encode())
# field headers and lengths that add up, but protobuf still refuses to parse the message
PARSE_FAILURES = {
    "field-number-0": UID_FIELD + key(0, 0) + b"\x01",
    "field-number-2^29": UID_FIELD + key(2**29, 0) + b"\x01",
    "key-over-32-bits": UID_FIELD + encode_varint(2**35) + b"\x01",
    "uid-not-utf8": field(1, b"expert.\xff"),
    "dtype-not-utf8": UID_FIELD + field(2, field(4, b"\xfe\xff")),
    "truncated-packed-shape": UID_FIELD + field(2, field(2, b"\x80")),
}

FLOAT_HEAD = field(4, b"float32")
# refused before or after parsing, each with a message that names the problem
REFUSED = {
    "empty-message": (b"", "unknown expert uid ''"),
    "varint-of-11-bytes": (UID_FIELD + key(3, 0) + b"\xff" * 10 + b"\x01", "truncated or overlong varint"),
    "length-past-the-end": (UID_FIELD + key(3, 2) + encode_varint(100) + b"xx", "runs past its end"),
    "wire-type-6": (UID_FIELD + encode_varint(3 << 3 | 6), "wire type 6"),
    "wire-type-7": (UID_FIELD + encode_varint(3 << 3 | 7), "wire type 7"),
    "group-in-a-tensor": (UID_FIELD + field(2, key(7, 3) + key(7, 4)), "wire type 3"),
    "packed-shape-of-65-bytes": (UID_FIELD + field(2, field(2, b"\x01" * 65) + FLOAT_HEAD), "dimensions"),
    "huge-shape-no-buffer": (
        UID_FIELD + field(2, field(2, encode_varint(2**32 - 1) * 4) + FLOAT_HEAD),
        "could not be decoded",
    ),
    "buffer-shorter-than-shape": (
        UID_FIELD + field(2, field(2, encode_varint(1000) * 2) + FLOAT_HEAD),
        "buffer has 0 bytes",
    ),
    "second-uid-adds-tensors": (UID_FIELD + field(2, b"") + field(1, b"expert.1") + field(2, b""), "got more"),
    "field-number-2^29-1": (UID_FIELD + key(2**29 - 1, 0) + b"\x01", "expects 1 tensors, got 0"),
    "deeply-nested-unknown": (UID_FIELD + field(9, field(9, field(9, b"\x0b" * 100))), "expects 1 tensors, got 0"),
}


@pytest.mark.parametrize("data, message", REFUSED.values(), ids=REFUSED.keys())
async def test_malformed_request_is_refused_with_a_clear_error(hostile_server, attacker, data, message):
    client, stub = attacker
    with pytest.raises(P2PHandlerError, match=message):
        await send_unary(client, hostile_server, data)
    with pytest.raises(P2PHandlerError, match=message):
        await drain(await stub.rpc_forward_stream(as_stream([EncodedMessage([data])])))
    await good_forward(stub)


async def send_unary(client, server, data: bytes, name: str = "rpc_forward") -> bytes:
    handle = get_handle_name(None, "ConnectionHandler", name)
    return await client._client.call_unary_handler(server.dht.peer_id, handle, data)


@pytest.mark.parametrize("data", PARSE_FAILURES.values(), ids=PARSE_FAILURES.keys())
async def test_unary_request_that_protobuf_cannot_parse_is_refused_clearly(hostile_server, attacker, data):
    client, stub = attacker
    with pytest.raises(P2PHandlerError, match="not a valid expert message"):
        await send_unary(client, hostile_server, data)
    await good_forward(stub)


@pytest.mark.parametrize("data", PARSE_FAILURES.values(), ids=PARSE_FAILURES.keys())
async def test_stream_message_that_protobuf_cannot_parse_is_refused_clearly(attacker, data):
    _, stub = attacker
    valid_first = make_request(UID, torch.randn(2, HIDDEN))
    with pytest.raises(P2PHandlerError, match="not a valid expert message"):
        await drain(await stub.rpc_forward_stream(as_stream([valid_first, EncodedMessage([data])])))
    await good_forward(stub)


@pytest.mark.timeout(60)
async def test_other_clients_are_served_during_a_barrage_of_garbage(hostile_server, attacker):
    client, stub = attacker
    garbage = [*PARSE_FAILURES.values(), b"\xff" * 64, b"\x0b\x0c", UID_FIELD + b"\x12\x00" * 10_000, b""]
    inputs = [torch.randn(3, HIDDEN) for _ in range(3)]
    expected = [await good_forward_exact(stub, x) for x in inputs]

    async def barrage():
        for _ in range(20):
            for data in garbage:
                with pytest.raises(P2PHandlerError):
                    await send_unary(client, hostile_server, data, "rpc_backward")

    async def good_client():
        for _ in range(20):
            for x, output in zip(inputs, expected):
                assert torch.equal(await good_forward_exact(stub, x), output)

    await asyncio.gather(barrage(), good_client(), barrage())


async def good_forward_exact(stub, x: torch.Tensor) -> torch.Tensor:
    response = await stub.rpc_forward(make_request(UID, x), timeout=30)
    return deserialize_torch_tensor(response.tensors[0])


COMPRESSIONS = ["FLOAT16", "MEANSTD_16BIT", "UNIFORM_8BIT", "QUANTILE_8BIT", "BLOCKWISE_8BIT"]


def compressed(x: torch.Tensor, compression: str) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(x, runtime_pb2.CompressionType.Value(compression))


@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_compressed_requests_pass_the_scan(attacker, compression):
    _, stub = attacker
    x = torch.randn(64, HIDDEN)
    exact = await good_forward_exact(stub, x)
    request = runtime_pb2.ExpertRequest(uid=UID, tensors=[compressed(x, compression)])
    output = deserialize_torch_tensor((await stub.rpc_forward(request, timeout=30)).tensors[0])
    assert output.shape == exact.shape and (output - exact).abs().mean() < 0.05  # lossy codecs: close on average

    chunks = split_for_streaming(compressed(x, compression), chunk_size_bytes=256)  # several messages per tensor
    grads = split_for_streaming(compressed(torch.randn(64, HIDDEN), compression), chunk_size_bytes=256)
    messages = [runtime_pb2.ExpertRequest(uid=UID, tensors=[chunk]) for chunk in (*chunks, *grads)]
    assert len(messages) > 4
    responses = [response async for response in await stub.rpc_backward_stream(as_stream(messages))]
    (grad_input,) = [deserialize_torch_tensor(tensor) for response in responses for tensor in response.tensors]
    assert grad_input.shape == x.shape and torch.isfinite(grad_input).all()


def test_scan_of_a_worst_case_4_mib_request_takes_about_a_millisecond():
    counts = {f"ffn.{index}": 8 for index in range(1000)}
    bloated_tensor = (key(15, 0) + b"\x01") * (MAX_FIELDS_PER_TENSOR - 2) + field(2, b"\x01" * 64)
    fields = field(2, bloated_tensor) * 8 + (key(9, 0) + b"\x01") * (MAX_OTHER_FIELDS - 2)
    padding = field(10, bytes(4 * 1024**2 - len(fields) - 16))
    data = fields + padding + field(1, b"ffn.1")  # every field the scan accepts, and the uid last
    assert len(data) <= 4 * 1024**2
    started = time.perf_counter()
    for _ in range(20):
        scan_expert_request(data, counts, "forward")
    per_scan = (time.perf_counter() - started) / 20
    assert per_scan < 0.05, f"a scan took {per_scan * 1000:.1f} ms"


class CountingValues(dict):
    """Hosted tensor counts that record how often all of them are looked at."""

    looked_at_all = 0

    def values(self):
        CountingValues.looked_at_all += 1
        return super().values()


def test_request_that_names_its_expert_first_is_scanned_without_looking_at_every_hosted_expert():
    counts = CountingValues({f"ffn.{index}": 1 for index in range(10_000)})
    request = runtime_pb2.ExpertRequest(uid="ffn.7", tensors=[serialize_torch_tensor(torch.ones(2, 3))])
    scan_expert_request(request.SerializeToString(), counts, "forward")
    assert CountingValues.looked_at_all == 0, "each request cost a pass over all hosted experts"
    scan_expert_request(b"\x12\x00" + field(1, b"ffn.7"), counts, "forward")  # a tensor before the uid
    assert CountingValues.looked_at_all == 1
