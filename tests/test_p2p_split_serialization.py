"""serialize_in_parts: the concatenated parts parse to an equal message, with the large bytes field copied once."""

import os

import pytest

from hivemind.p2p import framing
from hivemind.p2p.split_serialization import MIN_SPLIT_BYTES, serialize_in_parts
from hivemind.proto import averaging_pb2, runtime_pb2

BIG = os.urandom(MIN_SPLIT_BYTES * 3 + 17)


def parse(message_type, parts):
    message = message_type()
    message.ParseFromString(b"".join(parts))
    return message


def tensor(**kwargs) -> runtime_pb2.Tensor:
    fields = dict(buffer=BIG, size=[3, 5], dtype="float16", compression=runtime_pb2.FLOAT16, chunks=4)
    fields.update(kwargs)
    return runtime_pb2.Tensor(**fields)


@pytest.mark.parametrize(
    "message",
    [
        tensor(),
        tensor(size=[], dtype="", chunks=0, compression=runtime_pb2.NONE),  # the bytes field alone
        averaging_pb2.AveragingData(
            code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"g" * 40, peer_id=b"p", tensor_part=tensor(), weight=0.5
        ),
        averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=BIG)),  # nothing else on the way
    ],
    ids=["tensor", "tensor-buffer-only", "averaging-data", "averaging-data-buffer-only"],
)
def test_large_bytes_field_is_split_off_and_the_message_survives(message):
    parts = serialize_in_parts(message)
    assert len(parts) == 2 and parts[-1] == BIG
    assert message.ByteSize() <= sum(map(len, parts)) <= message.ByteSize() + 16  # a sub-message may appear twice
    parsed = parse(type(message), parts)
    assert parsed == message
    assert parsed.SerializeToString() == message.SerializeToString()


def test_the_largest_of_two_bytes_fields_is_split_off():
    other = os.urandom(MIN_SPLIT_BYTES + 1)
    message = averaging_pb2.AveragingData(group_id=other, tensor_part=runtime_pb2.Tensor(buffer=BIG))
    parts = serialize_in_parts(message)
    assert parts[-1] == BIG and parse(averaging_pb2.AveragingData, parts) == message


def test_small_repeated_and_unknown_field_messages_are_serialized_as_usual():
    small = tensor(buffer=b"x" * 100)
    assert serialize_in_parts(small) == [small.SerializeToString()]

    repeated = runtime_pb2.ExpertRequest(uid="expert", tensors=[tensor()])  # the big field sits in a repeated one
    assert serialize_in_parts(repeated) == [repeated.SerializeToString()]

    with_unknown = runtime_pb2.Tensor()
    with_unknown.ParseFromString(tensor().SerializeToString() + b"\xf8\x06\x01")  # field 111 = 1, unknown here
    parts = serialize_in_parts(with_unknown)
    assert parts == [with_unknown.SerializeToString()]  # nothing is lost


def test_frames_carry_split_messages():
    message = tensor()
    frame = framing.encode_frame(message)
    marker, length = framing.decode_header(frame[: framing.FRAME_HEADER_LEN])
    assert marker == framing.MESSAGE_MARKER and length == len(frame) - framing.FRAME_HEADER_LEN
    assert parse(runtime_pb2.Tensor, [frame[framing.FRAME_HEADER_LEN :]]) == message
