"""Round trips and error bounds of every codec (hivemind.compression)."""

import pytest
import torch

from hivemind.compression import (
    BlockwiseQuantization,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Quantile8BitQuantization,
    ScaledFloat16Compression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.proto.runtime_pb2 import CompressionType

ALL_TYPES = [CompressionType.Value(name) for name in CompressionType.keys()]
LOSSY_FLOAT_TYPES = [t for t in ALL_TYPES if t != CompressionType.NONE]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def make_shapes():
    """(name, tensor factory) pairs covering ordinary, scalar, empty and non-contiguous tensors."""
    return {
        "matrix": lambda dtype: torch.randn(33, 70).to(dtype),
        "vector_over_one_block": lambda dtype: torch.randn(5000).to(dtype),
        "scalar": lambda dtype: torch.tensor(1.25).to(dtype),
        "empty": lambda dtype: torch.zeros(0).to(dtype),
        "empty_rows": lambda dtype: torch.zeros(3, 0).to(dtype),
        "empty_batch": lambda dtype: torch.zeros(0, 5).to(dtype),
        "transposed": lambda dtype: torch.randn(20, 30).to(dtype).t(),
        "strided": lambda dtype: torch.randn(40, 30).to(dtype)[::3, 1::2],
    }


SHAPES = make_shapes()


def supports(compression: int, dtype: torch.dtype) -> bool:
    if compression in (CompressionType.FLOAT16, CompressionType.MEANSTD_16BIT):
        return dtype.is_floating_point and dtype != torch.bfloat16
    if compression != CompressionType.NONE:
        return dtype.is_floating_point
    return True


def tolerance(compression: int, reference: torch.Tensor) -> float:
    """Max abs error allowed for a tensor of N(0, 1)-ish values."""
    if compression == CompressionType.NONE:
        return 0.0
    if compression in (CompressionType.FLOAT16, CompressionType.MEANSTD_16BIT):
        return 2e-2 if reference.dtype == torch.float16 else 5e-3
    if compression == CompressionType.BLOCKWISE_8BIT:
        return 0.05 * max(1.0, reference.abs().max().item())
    return 2.0  # uniform / quantile: edge bins absorb the tails


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
def test_float_round_trip_restores_shape_dtype_and_values(compression, dtype, shape_name):
    torch.manual_seed(0)
    tensor = SHAPES[shape_name](dtype)
    if not supports(compression, dtype):
        with pytest.raises(ValueError):
            serialize_torch_tensor(tensor, compression)
        return
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    if tensor.numel():
        error = (restored.double() - tensor.double()).abs().max().item()
        assert error <= tolerance(compression, tensor)


INTEGER_LIKE_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", INTEGER_LIKE_DTYPES + [torch.complex64, torch.complex128, torch.float64])
@pytest.mark.parametrize("shape_name", ["matrix", "scalar", "empty", "strided"])
def test_no_compression_is_bit_exact_for_every_numpy_dtype(dtype, shape_name):
    torch.manual_seed(0)
    source = SHAPES[shape_name](torch.float64) * 100
    tensor = source.to(dtype) if dtype != torch.bool else source > 0
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor))
    assert restored.dtype == tensor.dtype and restored.shape == tensor.shape
    assert torch.equal(restored, tensor)


@pytest.mark.parametrize("compression", LOSSY_FLOAT_TYPES, ids=CompressionType.Name)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_lossy_codecs_reject_non_floating_tensors_with_value_error(compression, dtype):
    with pytest.raises(ValueError, match="float"):
        serialize_torch_tensor(torch.ones(10, dtype=dtype), compression)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex32])
def test_no_compression_rejects_dtypes_without_a_wire_name(dtype):
    with pytest.raises(ValueError, match="dtype"):
        serialize_torch_tensor(torch.zeros(4).to(dtype))


def test_wire_test_vector_for_float32_pair():
    serialized = serialize_torch_tensor(torch.tensor([1.0, 2.0]))
    assert serialized.SerializeToString().hex() == "0a080000803f000000401201022207666c6f61743332"


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
def test_requires_grad_is_preserved(compression):
    tensor = torch.randn(10, 10, requires_grad=True)
    serialized = serialize_torch_tensor(tensor, compression)
    assert serialized.requires_grad and serialized.compression == compression
    restored = deserialize_torch_tensor(serialized)
    assert restored.requires_grad and restored.is_leaf
    assert not deserialize_torch_tensor(serialize_torch_tensor(tensor.detach(), compression)).requires_grad


def test_serializing_a_non_cpu_tensor_fails_an_assertion():
    with pytest.raises(AssertionError):
        serialize_torch_tensor(torch.zeros(3, device="meta"))


def test_legacy_bfloat16_is_sent_as_float32_by_default(monkeypatch):
    monkeypatch.delenv("USE_LEGACY_BFLOAT16", raising=False)
    tensor = torch.randn(7, 3).bfloat16()
    serialized = serialize_torch_tensor(tensor)
    assert serialized.dtype == "bfloat16" and len(serialized.buffer) == 4 * tensor.numel()
    assert serialized.buffer == tensor.float().numpy().tobytes()
    assert torch.equal(deserialize_torch_tensor(serialized), tensor)


def test_bfloat16_is_sent_as_raw_16_bit_words_without_legacy_mode(monkeypatch):
    monkeypatch.setenv("USE_LEGACY_BFLOAT16", "0")
    tensor = torch.randn(7, 3).bfloat16()
    serialized = serialize_torch_tensor(tensor)
    assert serialized.dtype == "bfloat16" and len(serialized.buffer) == 2 * tensor.numel()
    assert torch.equal(deserialize_torch_tensor(serialized), tensor)


def test_float16_clamps_to_the_float16_range():
    tensor = torch.tensor([1e6, -1e6, 65504.0, float("inf"), -float("inf"), 3.0])
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, CompressionType.FLOAT16))
    assert restored.tolist() == [65504.0, -65504.0, 65504.0, 65504.0, -65504.0, 3.0]


def test_float16_buffer_is_plain_half_values():
    tensor = torch.randn(11)
    serialized = serialize_torch_tensor(tensor, CompressionType.FLOAT16)
    assert serialized.dtype == "float32" and serialized.buffer == tensor.half().numpy().tobytes()


def test_meanstd_layout_is_halves_then_means_then_stds():
    tensor = torch.randn(4, 6) * 10 + 3
    serialized = serialize_torch_tensor(tensor, CompressionType.MEANSTD_16BIT)
    buffer = serialized.buffer
    assert len(buffer) == 4 * 6 * 2 + 4 * 4 + 4 * 4
    means = torch.frombuffer(bytearray(buffer[48:64]), dtype=torch.float32)
    stds = torch.frombuffer(bytearray(buffer[64:80]), dtype=torch.float32)
    assert torch.allclose(means, tensor.mean(dim=-1), atol=1e-5)
    assert torch.allclose(stds, tensor.std(dim=-1, unbiased=False), rtol=1e-4)


def test_meanstd_keeps_rows_with_different_scales_accurate():
    tensor = torch.randn(3, 100) * torch.tensor([[1e-3], [1.0], [1e4]]) + torch.tensor([[5.0], [-2.0], [1e5]])
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, CompressionType.MEANSTD_16BIT))
    relative_error = ((restored - tensor).abs().amax(dim=-1) / tensor.std(dim=-1)).max().item()
    assert relative_error < 5e-3


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
def test_8bit_codecs_decode_to_at_most_256_distinct_values(compression):
    tensor = torch.randn(20000)
    serialized = serialize_torch_tensor(tensor, compression)
    assert len(serialized.buffer) == 8 + 256 * 4 + tensor.numel()
    assert int.from_bytes(serialized.buffer[:8], "little") == 256
    restored = deserialize_torch_tensor(serialized)
    assert len(torch.unique(restored)) <= 256


@pytest.mark.parametrize(
    "compression, max_relative_rms",
    [
        (CompressionType.UNIFORM_8BIT, 0.02),
        (CompressionType.QUANTILE_8BIT, 0.035),
        (CompressionType.BLOCKWISE_8BIT, 0.02),
    ],
)
def test_8bit_codecs_have_small_relative_rms_error(compression, max_relative_rms):
    torch.manual_seed(1)
    tensor = torch.randn(100_000) * 3 + 1
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))
    relative_rms = ((restored - tensor).square().mean() / (tensor - tensor.mean()).square().mean()).sqrt().item()
    assert relative_rms < max_relative_rms


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
def test_8bit_codebook_entries_are_averages_of_their_bins(compression):
    tensor = torch.randn(5000)
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))
    for value in torch.unique(restored)[:20]:
        members = tensor[restored == value]
        assert abs(members.mean().item() - value.item()) < 1e-5


@pytest.mark.parametrize("compression", LOSSY_FLOAT_TYPES, ids=CompressionType.Name)
def test_constant_tensor_is_restored_exactly(compression):
    tensor = torch.full((300,), 0.5)
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))
    assert torch.allclose(restored, tensor, atol=1e-3)


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
def test_8bit_codecs_survive_nan_and_inf_inputs(compression):
    tensor = torch.tensor([1.0, float("nan"), 2.0, float("inf"), -float("inf")] * 10)
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))
    assert restored.shape == tensor.shape


def test_blockwise_absmax_bounds_the_error_per_block():
    tensor = torch.cat([torch.randn(4096) * 1e-3, torch.randn(4096) * 1e3])
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT))
    assert (restored[:4096] - tensor[:4096]).abs().max() < 1e-3 * 0.1
    assert (restored[4096:] - tensor[4096:]).abs().max() < 1e3 * 0.1


def test_blockwise_buffer_layout():
    tensor = torch.randn(5000)
    serialized = serialize_torch_tensor(tensor, CompressionType.BLOCKWISE_8BIT)
    buffer = serialized.buffer
    assert int.from_bytes(buffer[:8], "little") == 2 and int.from_bytes(buffer[8:16], "little") == 256
    assert len(buffer) == 16 + 2 * 4 + 256 * 4 + 5000
    absmax = torch.frombuffer(bytearray(buffer[16:24]), dtype=torch.float32)
    assert torch.equal(absmax, torch.stack([tensor[:4096].abs().max(), tensor[4096:].abs().max()]))


@pytest.mark.parametrize(
    "codec", [NoCompression(), Float16Compression(), ScaledFloat16Compression(), Uniform8BitQuantization()]
)
def test_compress_with_allow_inplace_gives_the_same_message(codec):
    tensor = torch.randn(64, 8)
    info = CompressionInfo.from_tensor(tensor)
    expected = codec.compress(tensor.clone(), info, allow_inplace=False)
    assert codec.compress(tensor.clone(), info, allow_inplace=True) == expected


@pytest.mark.parametrize(
    "codec, ratio",
    [
        (NoCompression(), 1.0),
        (Float16Compression(), 0.5),
        (ScaledFloat16Compression(), 0.5),
        (Uniform8BitQuantization(), 0.25),
        (Quantile8BitQuantization(), 0.25),
        (BlockwiseQuantization(), 0.25),
    ],
)
def test_estimated_compression_ratio_of_float32(codec, ratio):
    assert codec.estimate_compression_ratio(CompressionInfo.from_tensor(torch.zeros(10))) == ratio


def test_compressing_does_not_modify_the_input_by_default():
    tensor = torch.randn(100, 10) * 1e5
    original = tensor.clone()
    for compression in ALL_TYPES:
        serialize_torch_tensor(tensor, compression)
    assert torch.equal(tensor, original)


def test_decoded_tensor_is_writable_and_independent_of_the_message():
    serialized = serialize_torch_tensor(torch.arange(10.0))
    first = deserialize_torch_tensor(serialized)
    first += 1
    assert torch.equal(deserialize_torch_tensor(serialized), torch.arange(10.0))


def test_meanstd_statistics_of_float64_tensors_are_computed_in_float32():
    tensor = torch.randn(3, 513, dtype=torch.float64)
    buffer = serialize_torch_tensor(tensor, CompressionType.MEANSTD_16BIT).buffer
    means = torch.frombuffer(bytearray(buffer[2 * tensor.numel() : 2 * tensor.numel() + 12]), dtype=torch.float32)
    assert torch.equal(means, tensor.float().mean(dim=-1))


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
def test_8bit_codecs_on_tensors_larger_than_their_statistics_sample(compression):
    torch.manual_seed(2)
    tensor = torch.cat([torch.randn(2**20), torch.randn(2**19) * 0.1 + 5])
    restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))
    relative_rms = ((restored - tensor).square().mean() / (tensor - tensor.mean()).square().mean()).sqrt().item()
    assert relative_rms < 0.05 and len(torch.unique(restored)) <= 256


def test_8bit_encoding_is_deterministic():
    tensor = torch.randn(3 * 2**19)
    for compression in (CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT):
        assert serialize_torch_tensor(tensor, compression) == serialize_torch_tensor(tensor, compression)


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
def test_large_messages_built_in_place_round_trip(compression):
    tensor = torch.randn(300, 1000)
    serialized = serialize_torch_tensor(tensor, compression)
    if compression == CompressionType.NONE:
        assert serialized.buffer == tensor.numpy().tobytes()
    if compression == CompressionType.FLOAT16:
        assert serialized.buffer == tensor.half().numpy().tobytes()
    restored = deserialize_torch_tensor(serialized)
    assert restored.shape == tensor.shape and (restored - tensor).abs().max() <= tolerance(compression, tensor)


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_8bit_codecs_encode_every_small_16bit_tensor(compression, dtype):
    # a narrow spread makes the bin scale exceed the 16-bit range: the arithmetic must run in float32
    for seed in range(300):
        tensor = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(seed)).to(dtype)
        restored = deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))
        assert restored.shape == tensor.shape and restored.dtype == dtype
        low, high = float(tensor.min()), float(tensor.max())
        assert (
            bool(torch.isfinite(restored).all())
            and low - 1e-2 <= float(restored.min()) <= float(restored.max()) <= high + 1e-2
        )
