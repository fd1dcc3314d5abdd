"""Descriptions of tensors (shape, dtype, compression, ...) used in expert schemas and compression decisions."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Tuple

import torch

from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.serializer import MSGPackSerializer

__all__ = ["DescriptorBase", "TensorDescriptor", "BatchTensorDescriptor", "DUMMY_BATCH_SIZE"]

DUMMY_BATCH_SIZE = 3  # batch size of the example tensors made from a BatchTensorDescriptor

_PACKED_KEYS = ("size", "dtype", "layout", "requires_grad", "pin_memory", "compression", "device_type", "device_index")


class DescriptorBase:
    """Marker base class of tensor descriptors."""


@dataclass(frozen=True)
class TensorDescriptor(DescriptorBase):
    """Everything needed to re-create an (empty) tensor: shape, dtype, layout, device, grad flag, compression."""

    size: Tuple[Optional[int], ...]
    dtype: Optional[torch.dtype] = None
    layout: torch.layout = torch.strided
    device: Optional[torch.device] = None
    requires_grad: bool = False
    pin_memory: bool = False
    compression: int = CompressionType.NONE

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(self.size))

    @property
    def shape(self) -> Tuple[Optional[int], ...]:
        return self.size

    def numel(self) -> int:
        """Number of elements (the product of ``size``)."""
        return math.prod(self.size)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> TensorDescriptor:
        return cls(
            tensor.shape, tensor.dtype, tensor.layout, tensor.device, tensor.requires_grad, _safe_is_pinned(tensor)
        )

    def make_zeros(self, **kwargs) -> torch.Tensor:
        """A zero tensor matching this descriptor; keyword arguments override fields passed to ``torch.zeros``."""
        properties = asdict(self)
        properties.pop("compression")
        properties.update(kwargs)
        size = properties.pop("size")
        return torch.zeros(size, **properties)


@MSGPackSerializer.ext_serializable(type_code=0x51)
@dataclass(frozen=True, repr=True)
class BatchTensorDescriptor(TensorDescriptor):
    """A TensorDescriptor whose first dimension is the (variable) batch size, stored as ``None``."""

    def __init__(self, *instance_size: int, **kwargs):
        if len(instance_size) == 1 and isinstance(instance_size[0], (list, tuple, torch.Size)):
            instance_size = tuple(instance_size[0])
        super().__init__((None, *instance_size), **kwargs)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, compression: int = CompressionType.NONE) -> BatchTensorDescriptor:
        """Describe ``tensor[0]`` with a batch dimension; ``compression`` is kept for floating-point tensors only."""
        whole = TensorDescriptor.from_tensor(tensor)
        properties = {field.name: getattr(whole, field.name) for field in fields(whole) if field.name != "size"}
        if not tensor.is_floating_point():
            compression = CompressionType.NONE  # integer tensors are always sent as they are
        properties["compression"] = compression
        return cls(*whole.size[1:], **properties)

    def make_zeros(self, *batch_size: int, **kwargs) -> torch.Tensor:
        """A zero tensor of shape ``(*batch_size, *instance_size)``."""
        if self.layout == torch.sparse_coo:
            raise ValueError(f"cannot make zeros for a sparse tensor descriptor {self}")
        return super().make_zeros(size=(*batch_size, *self.shape[1:]), **kwargs)

    def packb(self) -> bytes:
        """Payload of msgpack ext 0x51: a map with keys in a fixed order."""
        return MSGPackSerializer.dumps(
            dict(
                size=self.size,
                dtype=str(self.dtype) if self.dtype is not None else None,
                layout=str(self.layout) if self.layout is not None else None,
                requires_grad=bool(self.requires_grad),
                pin_memory=bool(self.pin_memory),
                compression=int(self.compression),
                device_type=self.device.type if self.device is not None else None,
                device_index=self.device.index if self.device is not None else None,
            )
        )

    @classmethod
    def unpackb(cls, raw: bytes) -> BatchTensorDescriptor:
        """Parse an ext 0x51 payload; raises ValueError for anything that is not a valid descriptor."""
        packed_fields = MSGPackSerializer.loads(raw)
        if not isinstance(packed_fields, dict):
            raise ValueError(f"BatchTensorDescriptor payload must be a map, got {type(packed_fields).__name__}")
        missing = [key for key in _PACKED_KEYS if key not in packed_fields]
        if missing:
            raise ValueError(f"BatchTensorDescriptor payload lacks keys {missing}")

        size = packed_fields["size"]
        if not isinstance(size, (tuple, list)) or len(size) == 0 or size[0] is not None:
            raise ValueError(f"BatchTensorDescriptor size must be a sequence starting with None, got {size!r}")
        instance_size = size[1:]
        if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in instance_size):
            raise ValueError(f"BatchTensorDescriptor dimensions must be non-negative ints, got {size!r}")

        for key in ("requires_grad", "pin_memory"):
            if not isinstance(packed_fields[key], bool):
                raise ValueError(f"BatchTensorDescriptor {key} must be a bool, got {packed_fields[key]!r}")
        compression = packed_fields["compression"]
        if not isinstance(compression, int) or compression not in CompressionType.values():
            raise ValueError(f"BatchTensorDescriptor has an unknown compression {compression!r}")

        device = None
        if packed_fields["device_type"] is not None:
            device_type, device_index = packed_fields["device_type"], packed_fields["device_index"]
            if not isinstance(device_type, str) or not (device_index is None or isinstance(device_index, int)):
                raise ValueError(f"BatchTensorDescriptor has an invalid device {device_type!r}:{device_index!r}")
            try:
                device = torch.device(device_type, device_index)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"BatchTensorDescriptor has an invalid device {device_type!r}: {e}") from e

        return cls(
            *instance_size,
            dtype=_parse_torch_attribute(packed_fields["dtype"], torch.dtype, "dtype"),
            layout=_parse_torch_attribute(packed_fields["layout"], torch.layout, "layout"),
            device=device,
            requires_grad=packed_fields["requires_grad"],
            pin_memory=packed_fields["pin_memory"],
            compression=compression,
        )


def _parse_torch_attribute(name: Any, expected_type: type, what: str) -> Any:
    """Turn 'torch.float32' into torch.float32 (looked up by name, never evaluated)."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.startswith("torch.") or not name[len("torch.") :].isidentifier():
        raise ValueError(f"BatchTensorDescriptor {what} must look like 'torch.<name>', got {name!r}")
    value = getattr(torch, name[len("torch.") :], None)
    if not isinstance(value, expected_type):
        raise ValueError(f"BatchTensorDescriptor has an unknown {what} {name!r}")
    return value


def _safe_is_pinned(tensor: torch.Tensor) -> bool:
    """tensor.is_pinned(), or False where this torch build cannot tell (no accelerator)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(tensor.is_pinned())
    except RuntimeError:
        return False
