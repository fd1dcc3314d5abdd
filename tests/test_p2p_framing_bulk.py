"""bulk_message_type parses frames exactly as protobuf does, keeping the bulk field as a view of the payload."""

import random

import pytest
from google.protobuf.message import DecodeError

from hivemind.p2p.bulk_messages import MIN_BULK_BYTES, bulk_message_type
from hivemind.proto import averaging_pb2, runtime_pb2

BulkAveragingData = bulk_message_type(averaging_pb2.AveragingData, ("tensor_part", "buffer"))


def _message(buffer_size: int = MIN_BULK_BYTES + 5, **kwargs) -> averaging_pb2.AveragingData:
    message = averaging_pb2.AveragingData(code=2, group_id=b"g" * 20, peer_id=b"p" * 16, weight=0.25, **kwargs)
    message.tensor_part.buffer = random.Random(buffer_size).randbytes(buffer_size)
    message.tensor_part.size.extend([buffer_size // 4])
    message.tensor_part.dtype = "float32"
    message.tensor_part.compression = runtime_pb2.CompressionType.NONE
    return message


def _parse_both(payload):
    """(what protobuf parses, what the bulk type parses then materializes), or the exception types."""
    try:
        expected = averaging_pb2.AveragingData.FromString(bytes(payload))
    except DecodeError:
        expected = DecodeError
    received = BulkAveragingData()
    try:
        received.ParseFromString(payload)
        got = received.materialize()
    except DecodeError:
        got = DecodeError
    return expected, got


@pytest.mark.parametrize("container", [bytes, bytearray, lambda data: memoryview(bytearray(data))])
def test_bulk_stays_a_view_of_the_payload_and_the_rest_is_parsed(container):
    message = _message()
    payload = container(message.SerializeToString())
    received = BulkAveragingData()
    received.ParseFromString(payload)
    assert isinstance(received.bulk, memoryview) and received.bulk == message.tensor_part.buffer
    assert received.message.tensor_part.buffer == b""  # not copied into the message
    assert (received.code, received.group_id, received.peer_id, received.weight) == (2, b"g" * 20, b"p" * 16, 0.25)
    assert list(received.message.tensor_part.size) == [(MIN_BULK_BYTES + 5) // 4]
    if not isinstance(payload, bytes):
        assert received.bulk.obj is (payload.obj if isinstance(payload, memoryview) else payload)  # no copy
    assert received.tensor_part.buffer == message.tensor_part.buffer  # reading the field copies it in
    assert received.bulk is None and received.message == message


def test_small_and_unusual_messages_are_parsed_by_protobuf():
    small = _message(buffer_size=100)
    repeated_part = _message().SerializeToString() + _message(buffer_size=MIN_BULK_BYTES + 9).SerializeToString()
    for payload in [small.SerializeToString(), averaging_pb2.AveragingData(code=3).SerializeToString(), repeated_part]:
        received = BulkAveragingData()
        received.ParseFromString(payload)
        assert received.bulk is None
        assert received.message == averaging_pb2.AveragingData.FromString(payload)


def test_every_truncation_and_many_corruptions_parse_as_protobuf_does():
    payload = _message().SerializeToString()
    head = len(payload) - (MIN_BULK_BYTES + 5) - 40  # the fields around the buffer are where the walk works
    rng = random.Random(0)
    cases = [payload[:cut] for cut in list(range(0, 80)) + [len(payload) - 1, len(payload) - 30]]
    for _ in range(400):
        corrupted = bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            position = rng.choice([rng.randrange(0, 64), rng.randrange(max(0, head), len(payload))])
            corrupted[position] = rng.randrange(256)
        cases.append(bytes(corrupted))
    refused = 0
    for case in cases:
        expected, got = _parse_both(case)
        assert got == expected
        refused += expected is DecodeError
    assert refused > 10  # the corruptions did produce malformed frames


def test_a_type_is_made_only_for_a_path_of_singular_messages_ending_in_bytes():
    with pytest.raises(ValueError):
        bulk_message_type(averaging_pb2.AveragingData, ("tensor_part", "dtype"))
    with pytest.raises(ValueError):
        bulk_message_type(averaging_pb2.AveragingData, ("group", "buffer"))
    with pytest.raises(ValueError):
        bulk_message_type(runtime_pb2.Tensor, ("size",))
    tensor = runtime_pb2.Tensor(buffer=bytes(range(256)) * 300, dtype="uint8", size=[76800])
    received = bulk_message_type(runtime_pb2.Tensor, ("buffer",))()
    received.ParseFromString(tensor.SerializeToString())
    assert received.bulk == tensor.buffer and received.message.dtype == "uint8" and received.materialize() == tensor
