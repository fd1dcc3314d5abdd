"""Low-level helpers shared by the codecs: dtype names on the wire, validated reads of untrusted buffers."""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import warnings
from typing import Dict, Tuple

import torch
from google.protobuf.internal import api_implementation

from hivemind.proto import runtime_pb2

__all__ = [
    "TensorDecodeError",
    "CHUNK_ELEMENTS",
    "MAX_NDIM",
    "dtype_to_name",
    "name_to_dtype",
    "use_legacy_bfloat16",
    "tensor_to_bytes",
    "read_array",
    "validated_shape",
    "expect_length",
    "buffer_may_be_aliased",
    "empty_output",
    "MessageBuffer",
]

CHUNK_ELEMENTS = 2**21  # elementwise passes run over chunks this long (8 MiB of float32): they stay in L3 cache
MAX_NDIM = 64  # torch's own limit on the number of dimensions

# dtype names used in the Tensor message's dtype field: torch names without "torch.", which equal numpy's names
_NAME_TO_DTYPE: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
for _name in ("uint16", "uint32", "uint64"):  # present in torch >= 2.3 only
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _NAME_TO_DTYPE[_name] = getattr(torch, _name)
_DTYPE_TO_NAME = {dtype: name for name, dtype in _NAME_TO_DTYPE.items()}


class TensorDecodeError(ValueError):
    """A serialized tensor is malformed: wrong buffer size, unknown dtype or compression, absurd shape, ..."""


def dtype_to_name(dtype: torch.dtype) -> str:
    """Wire name of a dtype; ValueError for dtypes without a numpy equivalent (e.g. float8, complex32)."""
    name = _DTYPE_TO_NAME.get(dtype)
    if name is None:
        raise ValueError(f"cannot serialize tensors of dtype {dtype}: supported dtypes are {sorted(_NAME_TO_DTYPE)}")
    return name


def name_to_dtype(name: str) -> torch.dtype:
    dtype = _NAME_TO_DTYPE.get(name)
    if dtype is None:
        raise TensorDecodeError(f"serialized tensor has an unknown dtype {name[:64]!r}")
    return dtype


def use_legacy_bfloat16() -> bool:
    """USE_LEGACY_BFLOAT16 (default 1): send bfloat16 as float32 values under NONE compression."""
    return os.environ.get("USE_LEGACY_BFLOAT16", "1").strip().lower() not in ("0", "false", "no", "off", "")


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian C-order bytes of a tensor (one copy; non-contiguous tensors are gathered in the same copy)."""
    array = tensor.detach().cpu().resolve_conj().resolve_neg().numpy()
    if sys.byteorder != "little":  # pragma: no cover - all supported platforms are little-endian
        array = array.byteswap()
    return array.tobytes()


_silence_lock = threading.Lock()
_readonly_warning_silenced = False


def read_array(buffer: bytes, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``count`` elements of ``dtype`` read from ``buffer[offset:]`` WITHOUT copying (when aligned).

    The result shares memory with the (immutable) buffer: callers must not modify it. The caller has already
    checked that the buffer is long enough.
    """
    global _readonly_warning_silenced
    if dtype == torch.bool:  # any nonzero byte is True; never create bool tensors holding other bit patterns
        return read_array(buffer, offset, count, torch.uint8) != 0
    if count == 0:
        return torch.empty(0, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if offset % itemsize != 0:  # keep data aligned for vectorized kernels: copy this (usually small) slice
        buffer, offset = bytes(memoryview(buffer)[offset : offset + count * itemsize]), 0
    if not _readonly_warning_silenced:
        # torch warns once per process that the buffer is read-only; we never write to these views
        with _silence_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
            _readonly_warning_silenced = True
    else:
        result = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    if sys.byteorder != "little":  # pragma: no cover
        result = torch.from_numpy(result.numpy().byteswap())
    return result


def validated_shape(serialized: runtime_pb2.Tensor) -> Tuple[Tuple[int, ...], int]:
    """(shape, numel) of a serialized tensor, rejecting more than MAX_NDIM dimensions and shapes
    whose strides would not fit in int64 (torch cannot build them even when a zero size makes them empty)."""
    ndim = len(serialized.size)  # checked before the dimensions become Python ints: a peer may send millions
    if ndim > MAX_NDIM:
        raise TensorDecodeError(f"serialized tensor has {ndim} dimensions, at most {MAX_NDIM} are supported")
    shape = tuple(serialized.size)
    if math.prod(size for size in shape if size > 0) >= 2**63:
        raise TensorDecodeError(f"serialized tensor shape {shape} has more than 2**63 elements per zero-size slice")
    return shape, math.prod(shape)


def expect_length(buffer: bytes, expected: int, what: str) -> None:
    if len(buffer) != expected:
        raise TensorDecodeError(f"{what}: buffer has {len(buffer)} bytes, expected {expected}")


# With the upb protobuf backend, every read of a bytes field returns a NEW bytes object that nobody else references,
# so a decoded tensor may use that memory directly instead of copying it. Other backends hand out the stored object.
_PROTOBUF_RETURNS_FRESH_BYTES = api_implementation.Type() == "upb"


def buffer_may_be_aliased(buffer: bytes) -> bool:
    """True if a tensor returned to the user may share memory with ``buffer`` (a fresh, private bytes object)."""
    # bytes of length 0 and 1 are interned singletons in CPython: never let anyone write into those
    return _PROTOBUF_RETURNS_FRESH_BYTES and len(buffer) > 1


_HUGE_PAGE = 2**21
_MADV_HUGEPAGE = 14


def _load_madvise():
    """libc's madvise where transparent huge pages can be requested per region (Linux, THP not 'never')."""
    try:
        if not sys.platform.startswith("linux"):
            return None
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        return madvise
    except (OSError, AttributeError):
        return None


_madvise = _load_madvise()


def empty_output(numel: int, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """torch.empty for a large result that is about to be written once: on Linux, its memory is marked for
    transparent huge pages first, so that the first writes fault in 2 MiB pages instead of 512 times more 4 KiB
    pages (which can cost more than the computation itself for freshly mapped memory)."""
    result = torch.empty(numel, dtype=dtype, device=device)
    _advise_huge_pages(result)
    return result


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask the kernel for transparent huge pages under a large, not yet touched CPU tensor (advisory only)."""
    size = tensor.numel() * tensor.element_size()
    if _madvise is not None and tensor.device.type == "cpu" and size >= 4 * _HUGE_PAGE:
        start = tensor.data_ptr()
        aligned_start = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        aligned_length = (start + size - aligned_start) & ~(_HUGE_PAGE - 1)
        _madvise(aligned_start, aligned_length, _MADV_HUGEPAGE)  # failures change nothing


def _load_bytes_constructor():
    """CPython's PyBytes_FromStringAndSize, which can create a bytes object with uninitialized contents."""
    try:
        constructor = ctypes.pythonapi.PyBytes_FromStringAndSize
        constructor.restype = ctypes.py_object
        constructor.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        return constructor
    except (AttributeError, OSError):  # not CPython
        return None


_new_uninitialized_bytes = _load_bytes_constructor()
_DIRECT_BYTES_MIN_SIZE = 2**16


class MessageBuffer:
    """A writable uint8 tensor of ``nbytes`` that becomes the ``bytes`` of a message without another copy.

    For large CPU buffers the tensor is a view of a NEW bytes object with uninitialized contents (the C-API's
    PyBytes_FromStringAndSize(NULL, n)): the codec fills it, then :meth:`to_bytes` hands over the object, which
    nobody else has seen yet. Elsewhere this is an ordinary tensor and :meth:`to_bytes` copies it.
    """

    def __init__(self, nbytes: int, device: torch.device = torch.device("cpu")):
        self._bytes = None
        if (
            _new_uninitialized_bytes is not None
            and torch.device(device).type == "cpu"
            and nbytes >= _DIRECT_BYTES_MIN_SIZE
        ):
            self._bytes = _new_uninitialized_bytes(None, nbytes)
            self.tensor = read_array(self._bytes, 0, nbytes, torch.uint8)  # writable here: we own the new object
            _advise_huge_pages(self.tensor)
        else:
            self.tensor = empty_output(nbytes, torch.uint8, device)

    def to_bytes(self) -> bytes:
        """The filled buffer as bytes; the tensor must not be written to afterwards."""
        if self._bytes is None:
            return tensor_to_bytes(self.tensor)
        result, self._bytes, self.tensor = self._bytes, None, None
        return result


def floating_output_dtype(serialized_tensor: runtime_pb2.Tensor) -> torch.dtype:
    """The dtype a floating-point codec (16-bit, 8-bit) decodes to; a message naming any other dtype is malformed."""
    dtype = name_to_dtype(serialized_tensor.dtype)
    if not dtype.is_floating_point:
        codec = runtime_pb2.CompressionType.Name(serialized_tensor.compression)
        raise TensorDecodeError(f"a {codec} tensor must have a floating dtype, got {serialized_tensor.dtype}")
    return dtype
