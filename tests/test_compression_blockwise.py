"""BLOCKWISE_8BIT: the pure-torch kernel matches bitsandbytes byte for byte, and each decodes the other."""

import pytest
import torch

from hivemind.compression import blockwise_kernel, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.compression import quantization as quantization_module
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType


@pytest.fixture(scope="module")
def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    """Make BlockwiseQuantization use the pure-torch kernel, as on a peer without bitsandbytes."""
    monkeypatch.setattr(quantization_module, "_bitsandbytes_by_device", {"cpu": None})


def tensors_to_compare():
    generator = torch.Generator().manual_seed(42)
    return {
        "gaussian_partial_block": torch.randn(10_000, generator=generator),
        "tiny_values": torch.randn(5000, generator=generator) * 1e-6,
        "huge_values": torch.randn(5000, generator=generator) * 1e6,
        "skewed": torch.rand(9000, generator=generator) - 0.2,
        "zero_block": torch.cat([torch.zeros(4096), torch.randn(100, generator=generator)]),
        "zero_blocks_between_and_after": torch.cat(
            [torch.randn(4096, generator=generator), torch.zeros(2 * 4096), torch.randn(4096, generator=generator)]
            + [torch.zeros(777)]
        ),
        "exact_block_multiple": torch.randn(2 * 4096, generator=generator),
        "single_element": torch.tensor([-3.5]),
        "code_midpoints": torch.cat([torch.tensor([1.0]), (blockwise_kernel.dynamic_code()[:-1] * 0.5 * 2)]),
    }


TENSORS = tensors_to_compare()


def test_dynamic_code_equals_bitsandbytes_code(bnb_functional):
    assert torch.equal(blockwise_kernel.dynamic_code(), bnb_functional.create_dynamic_map())


def test_dynamic_code_is_sorted_256_values_in_unit_range():
    code = blockwise_kernel.dynamic_code()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] >= code[:-1]) and code.max() == 1.0 and code.min() > -1.0 and (code == 0).any()


@pytest.mark.parametrize("name", list(TENSORS))
def test_kernel_indices_and_absmax_equal_bitsandbytes(bnb_functional, name):
    tensor = TENSORS[name]
    expected_indices, state = bnb_functional.quantize_blockwise(tensor, blocksize=4096)
    indices, absmax = blockwise_kernel.quantize_blockwise(tensor)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("name", list(TENSORS))
def test_fallback_message_bytes_equal_bitsandbytes_message_bytes(bnb_functional, name, monkeypatch):
    tensor = TENSORS[name]
    with_bnb = serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT)
    monkeypatch.setattr(quantization_module, "_bitsandbytes_quantize", lambda flat: None)
    without_bnb = serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT)
    assert without_bnb.SerializeToString() == with_bnb.SerializeToString()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fallback_bytes_equal_bitsandbytes_bytes_for_other_float_dtypes(bnb_functional, dtype, monkeypatch):
    tensor = (torch.randn(6000) * 3).to(dtype)
    with_bnb = serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT)
    monkeypatch.setattr(quantization_module, "_bitsandbytes_quantize", lambda flat: None)
    assert serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT) == with_bnb


def test_fallback_decodes_what_bitsandbytes_encoded(bnb_functional):
    tensor = TENSORS["gaussian_partial_block"]
    indices, state = bnb_functional.quantize_blockwise(tensor, blocksize=4096)
    expected = bnb_functional.dequantize_blockwise(indices, state)
    decoded = blockwise_kernel.dequantize_blockwise(indices, state.absmax, state.code)
    assert torch.equal(decoded, expected)


def test_bitsandbytes_decodes_what_the_fallback_encoded(bnb_functional, without_bitsandbytes):
    tensor = TENSORS["skewed"]
    message = serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT)
    indices, absmax = blockwise_kernel.quantize_blockwise(tensor)
    decoded_by_bnb = bnb_functional.dequantize_blockwise(
        indices, absmax=absmax, code=blockwise_kernel.dynamic_code(), blocksize=4096
    )
    assert torch.equal(deserialize_torch_tensor(message), decoded_by_bnb)


def test_round_trip_without_bitsandbytes(without_bitsandbytes):
    tensor = torch.randn(3, 3000)
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT))
    assert (restored - tensor).abs().max() < 0.05 * tensor.abs().max()


def test_zero_blocks_use_index_zero_and_decode_to_zero(without_bitsandbytes):
    message = serialize_torch_tensor(torch.zeros(5000), CompressionType.BLOCKWISE_8BIT)
    assert message.buffer[-5000:] == bytes(5000)
    assert torch.equal(deserialize_torch_tensor(message), torch.zeros(5000))


def test_nan_values_do_not_break_the_block_scale(without_bitsandbytes):
    tensor = torch.tensor([1.0, float("nan"), -2.0, 0.5])
    _, absmax = blockwise_kernel.quantize_blockwise(tensor)
    assert absmax.tolist() == [2.0]


def test_decoding_uses_the_code_book_from_the_message():
    code = torch.linspace(-1, 1, 256)
    absmax = torch.tensor([2.0])
    indices = torch.tensor([0, 128, 255], dtype=torch.uint8)
    buffer = b"".join(
        [(1).to_bytes(8, "little"), (256).to_bytes(8, "little")]
        + [t.numpy().tobytes() for t in (absmax, code, indices)]
    )
    message = runtime_pb2.Tensor(buffer=buffer, size=[3], dtype="float32", compression=CompressionType.BLOCKWISE_8BIT)
    assert torch.allclose(deserialize_torch_tensor(message), code[[0, 128, 255]] * 2.0)


def test_failing_bitsandbytes_falls_back_to_the_pure_torch_kernel(monkeypatch):
    def broken_quantize(flat):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(quantization_module, "_bitsandbytes_by_device", {"cpu": {"quantize": broken_quantize}})
    tensor = torch.randn(5000)
    message = serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT)
    indices, absmax = blockwise_kernel.quantize_blockwise(tensor)
    assert message.buffer[-5000:] == indices.numpy().tobytes()
    assert quantization_module._bitsandbytes_by_device["cpu"] is None  # not tried again


def test_decoding_with_and_without_bitsandbytes_gives_identical_tensors(bnb_functional, monkeypatch):
    message = serialize_torch_tensor(TENSORS["gaussian_partial_block"], CompressionType.BLOCKWISE_8BIT)
    with_bnb = deserialize_torch_tensor(message)
    assert quantization_module._bitsandbytes_by_device["cpu"] is not None, "bitsandbytes failed and was disabled"
    monkeypatch.setattr(quantization_module, "_bitsandbytes_by_device", {"cpu": None})
    assert torch.equal(deserialize_torch_tensor(message), with_bnb)
