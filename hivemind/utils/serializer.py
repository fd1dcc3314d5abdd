"""
MessagePack serialization with hivemind's ext types: tuples are ext 0x40, classes can register more.

Decoding is safe for bytes from the network: nesting depth and the number of items are bounded (see
:meth:`MSGPackSerializer.loads`), tuples are decoded iteratively rather than by recursion, and nothing is allocated for
sizes the input claims.
"""

from __future__ import annotations

import operator
import threading
from abc import ABC, abstractmethod
from functools import reduce
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, TypeVar

import msgpack

from hivemind.utils.logging import get_logger

__all__ = ["SerializerBase", "MSGPackSerializer", "MSGPackDecodeError"]

logger = get_logger(__name__)
T = TypeVar("T")


class MSGPackDecodeError(ValueError):
    """Raised by :meth:`MSGPackSerializer.loads` for malformed, truncated, too deeply nested or undecodable input."""


class _PendingTuple:
    """A tuple holding arrays, maps or tuples: built bottom-up once the whole input is decoded, without recursion."""

    __slots__ = ("data", "items", "result")

    def __init__(self, data: Optional[bytes] = None, items: Optional[list] = None):
        self.data, self.items, self.result = data, items, None


_NESTED = frozenset((list, dict, tuple, _PendingTuple))  # each counts one level of depth
_RESOLVED = frozenset((list, dict, _PendingTuple))
_TUPLE_RECURSION = 4  # tuples inside tuples decoded directly by the ext hook (each level: ~50 KB of C stack)
# msgpack's C decoder refuses arrays and maps nested more than 1024 deep (StackError). Decoding a document inside
# 1024 - MAX_NESTING_DEPTH single-item arrays therefore lets msgpack itself check, at C speed, that the document's own
# arrays and maps are at most MAX_NESTING_DEPTH deep; then only documents holding tuples need the walk of _resolve.
# The wrapping costs about as much as walking a few KB of containers, so smaller documents (and big ones made of few
# big strings) are walked instead, as always with msgpack's pure-python fallback, which has no such limit.
_MSGPACK_MAX_DEPTH = 1024
_WRAP_MIN_BYTES = 4096
_WRAP_MAX_BYTES_PER_ITEM = 512  # a document whose top-level items are bigger on average is mostly strings or binary
_FIX_CONTAINERS = range(0x80, 0xA0)  # fixmap and fixarray: the item count is in the low 4 bits
_BIG_CONTAINERS = {0xDC: 2, 0xDE: 2, 0xDD: 4, 0xDF: 4}  # array and map 16/32: the bytes of the item count


def _worth_wrapping(buf: bytes) -> bool:
    """
    Whether decoding inside the wrapper (constant cost ~50 us) likely beats walking the decoded document: only for
    arrays and maps (else nothing outside ext payloads needs checking) that hold many small items, going by the item
    count in the header. The choice only affects speed: both ways check the same bounds.
    """
    first = buf[0]
    if first in _FIX_CONTAINERS:
        count = first & 0x0F
    elif first in _BIG_CONTAINERS:
        count = int.from_bytes(buf[1 : 1 + _BIG_CONTAINERS[first]], "big")
    else:
        return False
    return count <= 4 or count * _WRAP_MAX_BYTES_PER_ITEM >= len(buf)


_C_DECODER = getattr(msgpack.unpackb, "__module__", "") == "msgpack._cmsgpack"


class _DecodingState(threading.local):
    ext_nesting = 0  # registered ext payloads being decoded on this thread, one inside another
    tuple_nesting = 0  # tuple payloads being decoded on this thread, one inside another (up to _TUPLE_RECURSION)
    items_left: Optional[int] = None  # what is left of the item budget of the document being decoded (None: no count)
    items_limit = 0  # that document's whole budget (MAX_ITEMS), for the error message


_state = _DecodingState()


def _too_many_items() -> MSGPackDecodeError:
    return MSGPackDecodeError(
        f"msgpack document holds more than {_state.items_limit} items in its arrays, maps and tuples; refusing to "
        f"decode it (each costs tens of bytes of memory, see MSGPackSerializer.MAX_ITEMS)"
    )


def _spend_items(count: int) -> None:
    left = _state.items_left - count
    _state.items_left = left
    if left < 0:
        raise _too_many_items()


def _count_array(items: list) -> list:
    """list_hook while a document is counted: the array and its elements (called once the array is complete)."""
    _spend_items(1 + len(items))
    return items


def _count_map(mapping: dict) -> dict:
    """object_hook while a document is counted: the map, its keys and its values."""
    _spend_items(1 + 2 * len(mapping))
    return mapping


_warned_ext_codes: Set[int] = set()  # unknown ext codes already reported: a peer's flood of them logs once per code


def _built(item: Any) -> Any:
    return item.result if type(item) is _PendingTuple else item


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
    MAX_NESTING_DEPTH = 64  # arrays, maps and tuples inside one another
    MAX_EXT_NESTING = 4  # registered ext types (other than tuples) inside one another's payloads
    # arrays, maps and tuples of one document, plus their elements (a map's keys and values count one each): an empty
    # map takes one byte of msgpack but ~70 bytes of memory, so without this bound a 32 MiB document could take 2.5 GB
    MAX_ITEMS = 2**20
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
    def registered_type_codes(cls) -> bytes:
        """The type codes registered with :meth:`ext_serializable` (the tuple's is not one), one byte each."""
        return bytes(cls._ext_type_codes)

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
            if _state.tuple_nesting >= _TUPLE_RECURSION:  # deeper tuples are decoded by _resolve's loop instead
                return _PendingTuple(data=data)
            items = cls._unpack_tuple_items(data)
            # a tuple returned as such holds no containers: _resolve counts it as one level without looking inside
            return tuple(items) if _NESTED.isdisjoint(map(type, items)) else _PendingTuple(items=items)
        registered_type = cls._ext_type_codes.get(type_code)
        if registered_type is not None:
            nesting = _state.ext_nesting
            if nesting >= cls.MAX_EXT_NESTING:
                raise MSGPackDecodeError(
                    f"msgpack ext {type_code:#x} ({registered_type.__name__}) is nested inside more than "
                    f"{cls.MAX_EXT_NESTING} other registered ext types; refusing to decode it"
                )
            _state.ext_nesting = nesting + 1
            try:
                return registered_type.unpackb(data)
            finally:
                _state.ext_nesting = nesting
        if type_code not in _warned_ext_codes:
            _warned_ext_codes.add(type_code)
            logger.warning(
                f"Unknown msgpack ext type code {type_code:#x}: returning its payload as raw bytes (reported once per "
                f"code; register the type with MSGPackSerializer.ext_serializable to decode it)"
            )
        return data

    @staticmethod
    def _options(ext_hook: Callable[[int, bytes], Any]) -> Dict[str, Any]:
        """unpackb's keyword arguments; while a document is counted, hooks that spend its item budget as arrays and
        maps complete, and no single array or map may claim more items than the whole budget."""
        options: Dict[str, Any] = dict(ext_hook=ext_hook, raw=False, strict_map_key=False)
        if _state.items_left is not None:
            limit = _state.items_limit
            options.update(list_hook=_count_array, object_hook=_count_map, max_array_len=limit, max_map_len=limit)
        return options

    @classmethod
    def _unpack_tuple_items(cls, data: bytes) -> list:
        nesting = _state.tuple_nesting  # counts every decoder that this thread runs for a tuple's payload
        _state.tuple_nesting = nesting + 1
        try:
            if _state.items_left is None:
                items = msgpack.unpackb(data, ext_hook=cls._decode_ext_types, raw=False, strict_map_key=False)
            else:
                items = msgpack.unpackb(data, **cls._options(cls._decode_ext_types))
        finally:
            _state.tuple_nesting = nesting
        if type(items) is not list:
            raise MSGPackDecodeError(f"msgpack ext 0x40 (tuple) must contain an array, got {type(items).__name__}")
        return items

    @classmethod
    def _unpack(cls, buf: bytes) -> Any:
        # unpackb bounds every str/bin/array/map/ext length by len(buf): nothing is allocated for claimed sizes
        if _state.items_left is None:
            return msgpack.unpackb(buf, ext_hook=cls._decode_ext_types, raw=False, strict_map_key=False)
        return msgpack.unpackb(buf, **cls._options(cls._decode_ext_types))

    @classmethod
    def _unpack_wrapped(cls, buf: bytes) -> Tuple[Any, bool]:
        """
        Decode inside enough arrays that msgpack raises StackError if the document's own arrays and maps nest too
        deep; also say whether the document holds tuples (only then are there levels that msgpack did not count).
        """
        ext_codes: List[int] = []  # of the ext types outside any ext payload

        def decode_ext(type_code: int, data: bytes) -> Any:
            ext_codes.append(type_code)
            return cls._decode_ext_types(type_code, data)

        wrapper_depth = _MSGPACK_MAX_DEPTH - cls.MAX_NESTING_DEPTH
        if _state.items_left is not None:
            _state.items_left += 2 * wrapper_depth  # the wrapping arrays and their one element each
        wrapped = msgpack.unpackb(b"\x91" * wrapper_depth + buf, **cls._options(decode_ext))
        return reduce(operator.getitem, repeat(0, wrapper_depth), wrapped), cls.TUPLE_EXT_TYPE_CODE in ext_codes

    @classmethod
    def _resolve(cls, root: Any) -> Any:
        """
        Check the nesting depth level by level (breadth first) while decoding pending tuples, then build those tuples
        deepest first and put them in place of their placeholders. Neither pass recurses.
        """
        to_build: List[list] = []  # per depth: the pending tuples and the containers that hold some
        level = [root]
        while level:
            if len(to_build) >= cls.MAX_NESTING_DEPTH:
                raise MSGPackDecodeError(
                    f"msgpack arrays, maps and tuples are nested more than {cls.MAX_NESTING_DEPTH} deep; "
                    f"refusing to decode them"
                )
            next_level, here = [], []
            for container in level:
                kind = type(container)
                if kind is tuple:
                    continue  # see _decode_ext_types: it holds no containers
                if kind is _PendingTuple:
                    if container.items is None:
                        container.items, container.data = cls._unpack_tuple_items(container.data), None
                    here.append(container)
                    children = container.items
                else:
                    children = container
                if kind is dict:
                    if _NESTED.isdisjoint(map(type, children.values())) and _NESTED.isdisjoint(map(type, children)):
                        continue  # the common case, checked at C speed
                    nested = [child for child in children if type(child) in _NESTED]
                    nested += [child for child in children.values() if type(child) in _NESTED]
                elif _NESTED.isdisjoint(map(type, children)):  # the common case, checked at C speed
                    continue
                else:
                    nested = [child for child in children if type(child) in _NESTED]
                if nested:
                    next_level += nested
                    if kind is not _PendingTuple and _PendingTuple in map(type, nested):
                        here.append(container)  # a list or dict: its placeholders are replaced in place
            to_build.append(here)
            level = next_level
        for here in reversed(to_build):
            for container in here:
                kind = type(container)
                if kind is dict:
                    pairs = [(_built(key), _built(value)) for key, value in container.items()]
                    container.clear()
                    container.update(pairs)  # equal keys keep the first one's place and the last value
                else:
                    items = container.items if kind is _PendingTuple else container
                    items[:] = [_built(item) for item in items]
                    if kind is _PendingTuple:
                        container.result, container.items = tuple(items), None
        return _built(root)

    @classmethod
    def dumps(cls, obj: object) -> bytes:
        """Serialize ``obj``; raises TypeError for objects msgpack and the registered ext types cannot encode."""
        return msgpack.packb(obj, default=cls._encode_ext_types, use_bin_type=True, strict_types=True)

    @classmethod
    def loads(cls, buf: bytes) -> object:
        """
        Deserialize bytes produced by :meth:`dumps`. Safe for input from untrusted peers: raises
        :class:`MSGPackDecodeError` (a ValueError) on malformed or truncated input, and on input nested deeper than

        - ``MAX_NESTING_DEPTH`` (64) arrays, maps and tuples inside one another (``[1]`` is 1 deep, ``([1],)`` 2), or
        - ``MAX_EXT_NESTING`` (4) registered ext types (other than tuples) inside one another's payloads,

        and on input with more than ``MAX_ITEMS`` (2**20) arrays, maps, tuples and elements of these in all (the
        payloads of registered ext types decoded meanwhile included).

        Nested tuples are decoded by a loop, so their depth costs no stack; each registered ext level costs one nested
        msgpack decoder (~50 KB of C stack), which the second limit keeps well within any thread's stack. No size
        claimed by the input is trusted, and the item limit bounds the memory that containers take (an empty map is
        one byte of input but ~70 bytes of memory); other objects take at most ~20 times their encoded size.
        """
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise TypeError(f"MSGPackSerializer.loads expects bytes, got {type(buf).__name__}")
        # every item is at least one byte (two counted items: itself and its place in its container), so shorter
        # documents need no count; a registered ext type decoded inside a counted document spends the same budget
        if 2 * len(buf) > cls.MAX_ITEMS and _state.items_left is None:
            return cls._loads_counted(buf)
        try:
            if (
                _C_DECODER
                and len(buf) >= _WRAP_MIN_BYTES
                and _worth_wrapping(buf)
                and 0 <= cls.MAX_NESTING_DEPTH <= _MSGPACK_MAX_DEPTH
            ):
                decoded, has_tuples = cls._unpack_wrapped(buf)
                if not has_tuples:
                    return decoded  # arrays and maps only (other ext types are leaves), msgpack checked their depth
            else:
                decoded = cls._unpack(buf)
                if len(buf) <= cls.MAX_NESTING_DEPTH and type(buf) is bytes and b"\x40" not in buf:
                    return decoded  # no tuple (its ext code is 0x40), and too short to nest too deep
            return cls._resolve(decoded) if type(decoded) in _RESOLVED else decoded
        except MSGPackDecodeError:
            raise
        except msgpack.StackError as e:  # more than 1024 arrays and maps inside one another within one payload
            raise MSGPackDecodeError(
                f"msgpack arrays, maps and tuples are nested more than {cls.MAX_NESTING_DEPTH} deep; refusing to "
                f"decode them ({len(buf)} bytes)"
            ) from e
        except Exception as e:  # ExtraData, OutOfData, unhashable map keys, errors of registered types, ...
            if _state.items_left is not None and isinstance(e, ValueError) and "exceeds max_" in str(e):
                raise _too_many_items() from e  # one array or map claims more items than the whole budget
            raise MSGPackDecodeError(f"Malformed msgpack data ({len(buf)} bytes): {type(e).__name__}: {e}") from e

    @classmethod
    def _loads_counted(cls, buf: bytes) -> object:
        """:meth:`loads` with the item budget of MAX_ITEMS (spent by this document and the ext payloads inside it)."""
        _state.items_left, _state.items_limit = cls.MAX_ITEMS, cls.MAX_ITEMS
        try:
            return cls.loads(buf)
        finally:
            _state.items_left = None
