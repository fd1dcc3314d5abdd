"""Tensor compression: codecs, adaptive strategies and tensor (de)serialization for the wire."""

from hivemind.compression.adaptive import PerTensorCompression, RoleAdaptiveCompression, SizeAdaptiveCompression
from hivemind.compression.base import CompressionBase, CompressionInfo, NoCompression, TensorDecodeError, TensorRole
from hivemind.compression.floating import Float16Compression, ScaledFloat16Compression
from hivemind.compression.quantization import (
    BlockwiseQuantization,
    Quantile8BitQuantization,
    Uniform8BitQuantization,
)
from hivemind.compression.serialization import (
    deserialize_tensor_stream,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)

__all__ = [
    "CompressionBase",
    "CompressionInfo",
    "TensorRole",
    "NoCompression",
    "Float16Compression",
    "ScaledFloat16Compression",
    "Uniform8BitQuantization",
    "Quantile8BitQuantization",
    "BlockwiseQuantization",
    "SizeAdaptiveCompression",
    "RoleAdaptiveCompression",
    "PerTensorCompression",
    "serialize_torch_tensor",
    "deserialize_torch_tensor",
    "deserialize_tensor_stream",
    "TensorDecodeError",
]
