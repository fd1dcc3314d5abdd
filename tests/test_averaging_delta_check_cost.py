"""Per-part work of the all-reduce that the data path skips: reading the local values to check a small delta, and
building a part's CompressionInfo for a delta that no codec encodes."""

import math

import pytest
import torch

from hivemind.averaging import part_encoding
from hivemind.averaging.part_encoding import encode_delta, refuse_non_finite
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2

pytestmark = pytest.mark.timeout(30)

# below half the spacing of a dtype's values at its largest finite one, no finite value plus a delta rounds to inf
OVERFLOW_BOUNDS = {torch.float32: 2.0**103, torch.float64: 2.0**970, torch.float16: 16.0}


def test_small_delta_check_reads_only_the_delta(monkeypatch):
    measured = []
    original = part_encoding.largest_magnitude

    def counting(values):
        measured.append(values.numel())
        return original(values)

    monkeypatch.setattr(part_encoding, "largest_magnitude", counting)
    delta, local = torch.full((1000,), 1e30), torch.full((3000,), torch.finfo(torch.float32).max)
    refuse_non_finite(delta, local, what="delta")  # accepted: local + 1e30 rounds back to max, never to inf
    assert measured == [1000]  # the 3000 local values were not read
    assert torch.isfinite(local[:1000] + delta).all()


@pytest.mark.parametrize("dtype", list(OVERFLOW_BOUNDS))
def test_delta_at_the_overflow_bound_is_checked_against_local(dtype):
    bound = torch.tensor(OVERFLOW_BOUNDS[dtype], dtype=dtype)
    largest = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype)
    with pytest.raises(AllreduceException, match="inf once added"):
        refuse_non_finite(bound.repeat(2), largest, what="delta")  # max + bound rounds to inf
    with pytest.raises(AllreduceException, match="inf once added"):
        refuse_non_finite(-bound.repeat(2), largest, what="delta")  # -max - bound too
    below = torch.nextafter(bound, torch.tensor(0.0, dtype=dtype)).repeat(2)
    refuse_non_finite(below, largest, what="delta")  # the largest delta that never overflows: accepted
    assert torch.isfinite(largest + below).all() and torch.isfinite(largest - below).all()
    refuse_non_finite(bound.repeat(2), largest / 4, what="delta")  # at the bound, small local values: accepted


def test_non_finite_small_delta_is_still_refused():
    delta = torch.tensor([0.5, math.inf, 0.25])
    with pytest.raises(AllreduceException, match="inf/NaN"):
        refuse_non_finite(delta, torch.zeros(3), what="delta")


def test_uncompressed_delta_builds_no_compression_info():
    def no_info():
        raise AssertionError("an uncompressed delta needs no CompressionInfo")

    average, part = torch.full((8,), 2.0), torch.arange(8.0)
    reply = encode_delta(average, part, runtime_pb2.CompressionType.NONE, no_info)
    message = averaging_pb2.AveragingData.FromString(b"".join(bytes(chunk) for chunk in reply.parts))
    assert torch.equal(deserialize_torch_tensor(message.tensor_part), average - part)


def test_compressed_delta_gets_its_info_from_the_function():
    built = []

    def info():
        built.append(True)
        return CompressionInfo.from_tensor(torch.zeros(8), key=0)

    average, part = torch.full((8,), 2.0), torch.arange(8.0)
    reply = encode_delta(average, part, runtime_pb2.CompressionType.FLOAT16, info)
    assert built == [True]
    assert reply.tensor_part.compression == runtime_pb2.CompressionType.FLOAT16
    assert torch.equal(deserialize_torch_tensor(reply.tensor_part), average - part)
