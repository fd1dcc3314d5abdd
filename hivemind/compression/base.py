"""The compression interface (CompressionBase, CompressionInfo, TensorRole) and the identity codec NoCompression."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Optional

import torch

from hivemind.compression.buffers import (
    MessageBuffer,
    TensorDecodeError,
    buffer_may_be_aliased,
    dtype_to_name,
    empty_output,
    expect_length,
    name_to_dtype,
    read_array,
    tensor_to_bytes,
    use_legacy_bfloat16,
    validated_shape,
)
from hivemind.proto import runtime_pb2
from hivemind.utils.tensor_descr import TensorDescriptor

__all__ = [
    "TensorRole",
    "CompressionInfo",
    "CompressionBase",
    "NoCompression",
    "TensorDecodeError",
    "FloatingOnlyCodec",
]

# read once at import as in hivemind 1.1, where applications assign it (petals sets it to False); while it keeps
# its import-time value, the USE_LEGACY_BFLOAT16 environment variable is read on every call instead
USE_LEGACY_BFLOAT16 = use_legacy_bfloat16()
_USE_LEGACY_BFLOAT16_AT_IMPORT = USE_LEGACY_BFLOAT16
# dtypes whose tensors numpy can view: NONE writes their bytes with tensor_to_bytes (bfloat16 and the unsigned
# types that not every torch can hand to numpy take the general path)
_NUMPY_DTYPES = frozenset(
    (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128)
    + (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
)


class TensorRole(Enum):
    """What a tensor is used for; adaptive strategies may pick a codec by role."""

    ACTIVATION = 1
    PARAMETER = 2
    GRADIENT = 3
    OPTIMIZER = 4
    UNSPECIFIED = 5


@dataclasses.dataclass(frozen=True)
class CompressionInfo:
    """Auxiliary information about a tensor that helps choose and tune its compression."""

    key: Any  # a name or index that identifies the tensor (e.g. its position in a list of parameters)
    descriptor: TensorDescriptor  # the full tensor's shape, dtype, ...
    role: TensorRole = TensorRole.UNSPECIFIED
    part_index: int = 0  # index of this part when the tensor is sent in parts (e.g. all-reduce)
    part_size: Optional[int] = None  # number of elements in one part, None if the tensor is sent whole

    @classmethod
    def from_tensor(
        cls, tensor: torch.Tensor, key: Any = None, descriptor: Optional[TensorDescriptor] = None, **kwargs
    ) -> CompressionInfo:
        if descriptor is None:
            descriptor = TensorDescriptor.from_tensor(tensor)
        return cls(key=key, descriptor=descriptor, **kwargs)

    def get_part(self, part_index: int, part_size: Optional[int]) -> CompressionInfo:
        """The same information for one part of the tensor."""
        return dataclasses.replace(self, part_index=part_index, part_size=part_size)


def with_requires_grad(serialized_tensor: runtime_pb2.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the requires_grad flag that ``serialized_tensor`` carries (codecs' extract() ends with this)."""
    if serialized_tensor.requires_grad and not tensor.requires_grad:
        if not (tensor.is_floating_point() or tensor.is_complex()):
            raise TensorDecodeError(f"a {tensor.dtype} tensor cannot have requires_grad=True")
        tensor.requires_grad_(True)
    return tensor


class CompressionBase(ABC):
    """A codec: turns a tensor into a ``runtime_pb2.Tensor`` message and back."""

    compression_type: int  # runtime_pb2.CompressionType written into (and expected in) the messages
    compress_reads_info = True  # False: compress() ignores its CompressionInfo (callers may skip building one)

    @abstractmethod
    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        """Serialize ``tensor``; with ``allow_inplace=True`` the codec may overwrite the tensor's data."""

    @abstractmethod
    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        """Restore a tensor with its requires_grad flag; raises TensorDecodeError (a ValueError) for bad input."""

    @abstractmethod
    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        """Approximate compressed size / original size for a tensor described by ``info``."""

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"

    def _message(self, tensor: torch.Tensor, buffer: bytes, requires_grad: bool) -> runtime_pb2.Tensor:
        """The message carrying ``buffer`` for ``tensor`` (its shape and dtype name)."""
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=buffer,
            size=tensor.shape,
            dtype=dtype_to_name(tensor.dtype),
            requires_grad=requires_grad,
        )


class NoCompression(CompressionBase):
    """Exact copy of the tensor's bytes; bfloat16 is sent as float32 unless USE_LEGACY_BFLOAT16=0."""

    compression_type = runtime_pb2.CompressionType.NONE

    compress_reads_info = False  # serialize_torch_tensor need not build a CompressionInfo for this codec

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        requires_grad, tensor = tensor.requires_grad, tensor.detach()
        if tensor.dtype in _NUMPY_DTYPES:  # one copy into a new bytes object, with the least per-call overhead
            return self._message(tensor, tensor_to_bytes(tensor), requires_grad)
        wire_dtype = tensor.dtype
        assigned = USE_LEGACY_BFLOAT16 != _USE_LEGACY_BFLOAT16_AT_IMPORT
        if tensor.dtype == torch.bfloat16 and (USE_LEGACY_BFLOAT16 if assigned else use_legacy_bfloat16()):
            wire_dtype = torch.float32
        itemsize = torch.empty((), dtype=wire_dtype).element_size()
        message_buffer = MessageBuffer(tensor.numel() * itemsize, tensor.device)
        message_buffer.tensor.view(wire_dtype).view(tensor.shape).copy_(tensor)  # C order, conj/neg resolved
        return self._message(tensor, message_buffer.to_bytes(), requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape, numel = validated_shape(serialized_tensor)
        dtype = name_to_dtype(serialized_tensor.dtype)
        buffer = serialized_tensor.buffer
        if dtype == torch.bfloat16:
            if len(buffer) == 4 * numel:  # legacy format: float32 values
                legacy = empty_output(numel, torch.bfloat16).copy_(read_array(buffer, 0, numel, torch.float32))
                return with_requires_grad(serialized_tensor, legacy.reshape(shape))
            expect_length(buffer, 2 * numel, f"bfloat16 tensor of shape {list(shape)} (2 or 4 bytes per element)")
            raw = read_array(buffer, 0, numel, torch.int16)
        else:
            itemsize = torch.empty((), dtype=dtype).element_size()
            expect_length(buffer, numel * itemsize, f"{dtype_to_name(dtype)} tensor of shape {list(shape)}")
            raw = read_array(buffer, 0, numel, dtype)
        if dtype != torch.bool and not buffer_may_be_aliased(buffer):
            raw = empty_output(raw.numel(), raw.dtype).copy_(raw)
        if dtype == torch.bfloat16:
            raw = raw.view(torch.bfloat16)
        return with_requires_grad(serialized_tensor, raw.reshape(shape))

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return 1.0


class FloatingOnlyCodec(CompressionBase, ABC):
    """A lossy codec for floating-point values. It refuses tensors of any other dtype (integers, bool, complex) with
    ValueError, as the original library's codecs do; their compression ratio is 1, so that a caller that picks codecs
    by ratio sends them uncompressed (the averager and state sharing send such tensors with NoCompression)."""

    bits_per_element: int  # size of one element in the codec's own format, for estimate_compression_ratio

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        if not tensor.is_floating_point():
            raise ValueError(
                f"{self.__class__.__name__} compresses floating-point tensors only, got {tensor.dtype}; "
                f"send this tensor with NoCompression"
            )
        return self.compress_floating(tensor, info, allow_inplace)

    @abstractmethod
    def compress_floating(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        """Serialize a floating-point ``tensor`` in this codec's format."""

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        dtype = info.descriptor.dtype or torch.float32
        if not dtype.is_floating_point:
            return 1.0
        return self.bits_per_element / torch.finfo(dtype).bits
