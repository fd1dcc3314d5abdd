"""TensorDescriptor / BatchTensorDescriptor and the msgpack ext 0x51."""

import msgpack
import pytest
import torch

from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.tensor_descr import DUMMY_BATCH_SIZE, BatchTensorDescriptor, TensorDescriptor

WIRE_VECTOR = (
    "c77a5188a473697a65c7054092c0cd0400a56474797065ad746f7263682e666c6f61743332a66c61796f7574ad746f7263682e737472"
    "69646564ad72657175697265735f67726164c2aa70696e5f6d656d6f7279c2ab636f6d7072657373696f6e00ab6465766963655f7479"
    "7065c0ac6465766963655f696e646578c0"
)


def test_batch_descriptor_matches_the_wire_vector():
    descriptor = BatchTensorDescriptor(1024, dtype=torch.float32)
    assert MSGPackSerializer.dumps(descriptor).hex() == WIRE_VECTOR
    assert MSGPackSerializer.loads(bytes.fromhex(WIRE_VECTOR)) == descriptor


def test_batch_descriptor_round_trip_keeps_every_field():
    descriptor = BatchTensorDescriptor(
        3,
        4,
        dtype=torch.bfloat16,
        device=torch.device("cuda", 1),
        requires_grad=True,
        compression=CompressionType.UNIFORM_8BIT,
    )
    restored = MSGPackSerializer.loads(MSGPackSerializer.dumps({"schema": (descriptor, [descriptor])}))
    assert restored == {"schema": (descriptor, [descriptor])}
    assert isinstance(restored["schema"], tuple) and isinstance(restored["schema"][1], list)


def test_batch_descriptor_from_tensor_drops_the_batch_dimension():
    tensor = torch.randn(8, 3, 5, requires_grad=True)
    descriptor = BatchTensorDescriptor.from_tensor(tensor, compression=CompressionType.FLOAT16)
    assert descriptor.shape == (None, 3, 5) and descriptor.dtype == torch.float32
    assert descriptor.requires_grad and descriptor.compression == CompressionType.FLOAT16


def test_batch_descriptor_keeps_compression_for_floating_tensors_only():
    descriptor = BatchTensorDescriptor.from_tensor(torch.zeros(2, 3, dtype=torch.int64), CompressionType.FLOAT16)
    assert descriptor.compression == CompressionType.NONE


def test_batch_descriptor_make_zeros():
    descriptor = BatchTensorDescriptor(4, 2, dtype=torch.float64)
    zeros = descriptor.make_zeros(DUMMY_BATCH_SIZE)
    assert DUMMY_BATCH_SIZE == 3
    assert zeros.shape == (3, 4, 2) and zeros.dtype == torch.float64 and not zeros.any()
    assert descriptor.make_zeros(2, 5).shape == (2, 5, 4, 2)


def test_batch_descriptor_accepts_a_size_sequence():
    assert BatchTensorDescriptor((4, 2)) == BatchTensorDescriptor(4, 2)
    assert BatchTensorDescriptor(torch.Size([4, 2])).size == (None, 4, 2)


def test_tensor_descriptor_from_tensor_and_make_zeros():
    tensor = torch.ones(2, 3, dtype=torch.int32)
    descriptor = TensorDescriptor.from_tensor(tensor)
    assert descriptor.shape == (2, 3) and descriptor.numel() == 6 and descriptor.dtype == torch.int32
    assert torch.equal(descriptor.make_zeros(), torch.zeros(2, 3, dtype=torch.int32))
    assert descriptor.make_zeros(dtype=torch.float16).dtype == torch.float16


def test_descriptors_are_frozen_and_hashable():
    descriptor = TensorDescriptor((2, 3))
    with pytest.raises(AttributeError):
        descriptor.size = (4,)
    assert hash(descriptor) == hash(TensorDescriptor([2, 3]))


def ext_payload(**fields):
    values = dict(
        size=(None, 3),
        dtype="torch.float32",
        layout="torch.strided",
        requires_grad=False,
        pin_memory=False,
        compression=0,
        device_type=None,
        device_index=None,
    )
    values.update(fields)
    payload = MSGPackSerializer.dumps(values)
    return MSGPackSerializer.dumps(ext_wrapper(payload))


def ext_wrapper(payload: bytes):
    return msgpack.ExtType(0x51, payload)


def test_valid_ext_payload_decodes():
    assert MSGPackSerializer.loads(ext_payload()) == BatchTensorDescriptor(3, dtype=torch.float32)


@pytest.mark.parametrize(
    "fields",
    [
        dict(dtype="torch.no_such_dtype"),
        dict(dtype="__import__('os')"),
        dict(dtype="torch.nn"),
        dict(dtype=5),
        dict(layout="torch.float32"),
        dict(size=(3, 4)),
        dict(size=(None, -1)),
        dict(size=(None, "3")),
        dict(size="abc"),
        dict(compression=99),
        dict(requires_grad="yes"),
        dict(device_type="no_such_device"),
        dict(device_type=7),
    ],
)
def test_invalid_ext_payload_raises_value_error(fields):
    with pytest.raises(ValueError):
        MSGPackSerializer.loads(ext_payload(**fields))


def test_ext_payload_that_is_not_a_map_raises_value_error():
    with pytest.raises(ValueError):
        MSGPackSerializer.loads(MSGPackSerializer.dumps(ext_wrapper(MSGPackSerializer.dumps([1, 2]))))
