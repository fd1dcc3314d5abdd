"""MessagePack serialization with hivemind's ext types (WIRE.md §6): tuples are ext 0x40, classes can register more."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Type, TypeVar

import msgpack

from hivemind.utils.logging import get_logger

__all__ = ["SerializerBase", "MSGPackSerializer", "MSGPackDecodeError"]

logger = get_logger(__name__)
T = TypeVar("T")


class MSGPackDecodeError(ValueError):
    """Raised by :meth:`MSGPackSerializer.loads` for malformed, truncated or otherwise undecodable input."""


class SerializerBase(ABC):
    """Turns python objects into bytes and back."""

    @classmethod
    @abstractmethod
    def dumps(cls, obj: object) -> bytes:
        """Encode ``obj`` into bytes."""

    @classmethod
    @abstractmethod
    def loads(cls, buf: bytes) -> object:
        """Decode bytes produced by :meth:`dumps`."""


class MSGPackSerializer(SerializerBase):
    """msgpack with ``use_bin_type=True``, ``strict_types=True``, float64 floats, tuples as ext 0x40 (recursively).

    Other types become serializable with the :meth:`ext_serializable` class decorator.
    """

    TUPLE_EXT_TYPE_CODE = 0x40
    _ext_types: Dict[Type, int] = {}
    _ext_type_codes: Dict[int, Type] = {}

    @classmethod
    def ext_serializable(cls, type_code: int) -> Callable[[Type[T]], Type[T]]:
        """Class decorator: register a class with ``packb(self) -> bytes`` and classmethod ``unpackb(bytes)``."""
        if not isinstance(type_code, int) or not 0 <= type_code <= 127:
            raise ValueError(f"msgpack ext type code must be an int in [0, 127], got {type_code!r}")
        if type_code == cls.TUPLE_EXT_TYPE_CODE:
            raise ValueError(f"ext type code {type_code:#x} is reserved for tuples")

        def wrap(wrapped_type: Type[T]) -> Type[T]:
            if not callable(getattr(wrapped_type, "packb", None)) or not callable(
                getattr(wrapped_type, "unpackb", None)
            ):
                raise TypeError(f"{wrapped_type.__name__} must define packb() and unpackb() to be ext_serializable")
            registered = cls._ext_type_codes.get(type_code)
            if registered is not None and registered.__qualname__ != wrapped_type.__qualname__:
                raise ValueError(f"ext type code {type_code:#x} is already used by {registered.__qualname__}")
            cls._ext_type_codes[type_code] = wrapped_type
            cls._ext_types[wrapped_type] = type_code
            return wrapped_type

        return wrap

    @classmethod
    def _encode_ext_types(cls, obj: Any) -> msgpack.ExtType:
        type_code = cls._ext_types.get(type(obj))
        if type_code is None:
            for registered_type, code in cls._ext_types.items():
                if isinstance(obj, registered_type):
                    type_code = code
                    break
        if type_code is not None:
            return msgpack.ExtType(type_code, obj.packb())
        if isinstance(obj, tuple):
            return msgpack.ExtType(cls.TUPLE_EXT_TYPE_CODE, cls.dumps(list(obj)))
        raise TypeError(f"MSGPackSerializer cannot serialize an object of type {type(obj).__qualname__}: {obj!r:.100}")

    @classmethod
    def _decode_ext_types(cls, type_code: int, data: bytes) -> Any:
        if type_code == cls.TUPLE_EXT_TYPE_CODE:
            items = cls.loads(data)
            if not isinstance(items, list):
                raise MSGPackDecodeError(
                    f"msgpack ext {type_code:#x} (tuple) must contain an array, got {type(items).__name__}"
                )
            return tuple(items)
        registered_type = cls._ext_type_codes.get(type_code)
        if registered_type is not None:
            return registered_type.unpackb(data)
        logger.warning(f"Unknown msgpack ext type code {type_code:#x}, returning its {len(data)} raw bytes")
        return data

    @classmethod
    def dumps(cls, obj: object) -> bytes:
        """Serialize ``obj``; raises TypeError for objects msgpack and the registered ext types cannot encode."""
        return msgpack.packb(obj, default=cls._encode_ext_types, use_bin_type=True, strict_types=True)

    @classmethod
    def loads(cls, buf: bytes) -> object:
        """Deserialize bytes produced by :meth:`dumps`; raises ValueError on malformed or truncated input."""
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise TypeError(f"MSGPackSerializer.loads expects bytes, got {type(buf).__name__}")
        try:
            return msgpack.unpackb(buf, ext_hook=cls._decode_ext_types, raw=False, strict_map_key=False)
        except MSGPackDecodeError:
            raise
        except Exception as e:  # ExtraData, OutOfData, unhashable map keys, errors of registered types, ...
            raise MSGPackDecodeError(f"Malformed msgpack data ({len(buf)} bytes): {type(e).__name__}: {e}") from e
