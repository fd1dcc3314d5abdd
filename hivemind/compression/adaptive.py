"""Strategies that pick a concrete codec per tensor (by size, role or key); messages carry the concrete type."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping, Optional, Sequence, Union

import torch

from hivemind.compression.base import CompressionBase, CompressionInfo, NoCompression, TensorRole
from hivemind.compression.serialization import deserialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.value_checks import is_number

__all__ = ["AdaptiveCompressionBase", "SizeAdaptiveCompression", "RoleAdaptiveCompression", "PerTensorCompression"]


def _check_codec(name: str, codec: object) -> None:
    """A codec class (or None) would only fail at the first compress(), possibly in another process."""
    if not isinstance(codec, CompressionBase):
        hint = f" (an instance: {codec.__name__}())" if isinstance(codec, type) else ""
        raise TypeError(f"{name} must be a compression instance such as Float16Compression(), got {codec!r}{hint}")


class AdaptiveCompressionBase(CompressionBase, ABC):
    """Delegates to the codec returned by :meth:`choose_compression`."""

    @abstractmethod
    def choose_compression(self, info: CompressionInfo) -> CompressionBase: ...

    @property
    def compression_type(self):  # there is no single type: each message says which codec made it
        raise AttributeError(f"{self.__class__.__name__} has no single compression_type; see choose_compression")

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        codec = self.choose_compression(info)
        return codec.estimate_compression_ratio(info)

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        codec = self.choose_compression(info)
        return codec.compress(tensor, info, allow_inplace)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        """Decode a message made by any codec: the message names the codec that made it (see compress)."""
        return deserialize_torch_tensor(serialized_tensor)


class SizeAdaptiveCompression(AdaptiveCompressionBase):
    """Use ``greater_equal`` for tensors with at least ``threshold`` elements and ``less`` for smaller ones."""

    def __init__(self, threshold: int, less: CompressionBase, greater_equal: CompressionBase):
        if not is_number(threshold):
            raise TypeError(f"threshold must be a number of elements, got {threshold!r}")
        _check_codec("less", less)
        _check_codec("greater_equal", greater_equal)
        self.threshold = threshold
        self.less, self.greater_equal = less, greater_equal

    def choose_compression(self, info: CompressionInfo) -> CompressionBase:
        is_small = info.descriptor.numel() < self.threshold
        return self.less if is_small else self.greater_equal

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.threshold}, less={self.less}, greater_equal={self.greater_equal})"


class RoleAdaptiveCompression(AdaptiveCompressionBase):
    """Choose a codec by the tensor's role (``info.role``); roles without a codec use ``default``."""

    def __init__(
        self,
        *,
        activation: Optional[CompressionBase] = None,
        parameter: Optional[CompressionBase] = None,
        gradient: Optional[CompressionBase] = None,
        optimizer: Optional[CompressionBase] = None,
        default: CompressionBase = NoCompression(),
    ):
        explicit = (
            (TensorRole.ACTIVATION, activation),
            (TensorRole.PARAMETER, parameter),
            (TensorRole.GRADIENT, gradient),
            (TensorRole.OPTIMIZER, optimizer),
        )
        _check_codec("default", default)
        for role, codec in explicit:
            if codec is not None:
                _check_codec(role.name.lower(), codec)
        self.role_compressions = {role: default for role in TensorRole}
        self.role_compressions.update((role, codec) for role, codec in explicit if codec is not None)

    def choose_compression(self, info: CompressionInfo) -> CompressionBase:
        return self.role_compressions[info.role]

    def __repr__(self) -> str:
        roles = ", ".join(f"{role.name.lower()}={codec}" for role, codec in self.role_compressions.items())
        return f"{self.__class__.__name__}({roles})"


class PerTensorCompression(AdaptiveCompressionBase):
    """Choose a codec by ``info.key``: an index into a sequence, or a key of a mapping."""

    def __init__(self, tensor_compressions: Union[Sequence[CompressionBase], Mapping[object, CompressionBase]]):
        is_mapping = isinstance(tensor_compressions, Mapping)
        for key, codec in tensor_compressions.items() if is_mapping else enumerate(tensor_compressions):
            _check_codec(f"tensor_compressions[{key!r}]", codec)
        self.tensor_compressions = tensor_compressions

    def choose_compression(self, info: CompressionInfo) -> CompressionBase:
        try:
            return self.tensor_compressions[info.key]
        except (KeyError, IndexError, TypeError) as e:
            raise KeyError(f"{self.__class__.__name__} has no compression for tensor key {info.key!r}") from e

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.tensor_compressions!r})"
