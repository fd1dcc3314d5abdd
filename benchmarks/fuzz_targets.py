"""Fuzz targets for benchmarks/fuzz_decoders.py: every decoder that reads bytes a remote peer (or p2pd) controls.

A target is a decoder that takes ``bytes`` (what would arrive on the wire), the exception types that are its own
way to refuse input, and a hypothesis strategy that generates inputs: random bytes, valid encodings with byte-level
mutations (flips, insertions, deletions, truncations, planted boundary integers), and structured inputs built from
fields with boundary values. Any other exception escaping the decoder is a finding, as are crashes and hangs.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import msgpack
import torch
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from hivemind.compression import (
    TensorDecodeError,
    deserialize_tensor_stream,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackDecodeError, MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.timed_storage import get_dht_time

CompressionType = runtime_pb2.CompressionType
BOUNDARY_INTS = [0, 1, 2, 7, 255, 4096, 2**16, 2**30, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**64 - 1]
PLANTED = [v.to_bytes(8, "little") for v in (2**30, 2**31 - 1, 2**63 - 1, 2**64 - 1)] + [
    b"\x00" * 8,
    b"\xff\xff\xff\x7f",
    b"\x80\x80\x80\x80\x04",  # varint 2**30
    b"\xdd\xff\xff\xff\xff",  # msgpack array32 of 2**32-1 items
    b"\xc6\x40\x00\x00\x00",  # msgpack bin32 of 1 GiB
    b"\xd5\x40",  # msgpack fixext2 tuple
    b"\xc7\xff\x50",  # msgpack ext8 dictionary
]
_UINT32_BOUNDARIES = [v for v in BOUNDARY_INTS if v < 2**32]  # Tensor.size is uint32
_MP_INT = st.integers(-(2**63), 2**64 - 1)  # what msgpack can encode
DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool", "complex64"]


@dataclass
class FuzzTarget:
    name: str
    decode: Callable[[bytes], object]  # raises only `own` exceptions on bad input
    own: Tuple[type, ...]  # the layer's own ways of refusing input
    inputs: st.SearchStrategy  # of bytes
    about: str


# ----------------------------------------------------------------------------------------------- generic mutation


def _mutate(seed: bytes, mutations: Sequence[tuple]) -> bytes:
    data = bytearray(seed)
    for kind, position, arg in mutations:
        position = position % (len(data) + 1)
        if kind == "flip" and data:
            data[position % len(data)] ^= arg
        elif kind == "insert":
            data[position:position] = arg
        elif kind == "delete":
            del data[position : position + arg]
        elif kind == "truncate":
            del data[position:]
        elif kind == "plant":
            data[position : position + len(arg)] = arg
    return bytes(data)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16), st.none()),
    st.tuples(st.just("plant"), st.integers(0, 2**16), st.sampled_from(PLANTED)),
)


def mutated(seeds: Sequence[bytes], max_mutations: int = 6) -> st.SearchStrategy:
    return st.builds(_mutate, st.sampled_from(list(seeds)), st.lists(_MUTATION, min_size=1, max_size=max_mutations))


def bytes_inputs(seeds: Sequence[bytes], *extra: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.binary(max_size=512), mutated(seeds), *extra)


# ----------------------------------------------------------------------------------------------- tensors

_GEN = torch.Generator().manual_seed(0)
_SOURCES = [torch.randn(shape, generator=_GEN) for shape in [(3, 5), (0,), (1,), (5000,)]]
_SOURCES.append(torch.tensor([[[0.5, -1.0, 0.25]], [[2.0, 0.0, -0.75]]], dtype=torch.float16))


def _tensor_seeds(compression: int) -> List[runtime_pb2.Tensor]:
    sources = list(_SOURCES)
    if compression == CompressionType.NONE:
        sources += [torch.arange(6).reshape(2, 3), torch.ones(4, dtype=torch.bool), _SOURCES[0].bfloat16()]
    return [serialize_torch_tensor(t, compression) for t in sources]


def decode_tensor(data: bytes) -> torch.Tensor:
    return deserialize_torch_tensor(runtime_pb2.Tensor.FromString(data))


def _rebuild_tensor(base: runtime_pb2.Tensor, buffer_mutations, size, dtype, compression, requires_grad) -> bytes:
    message = runtime_pb2.Tensor()
    message.CopyFrom(base)
    message.buffer = _mutate(base.buffer, buffer_mutations)
    if size is not None:
        del message.size[:]
        message.size.extend(size)
    if dtype is not None:
        message.dtype = dtype
    if compression is not None:
        message.compression = compression
    message.requires_grad = requires_grad
    return message.SerializeToString()


def tensor_fields(compression: int) -> st.SearchStrategy:
    return st.builds(
        _rebuild_tensor,
        st.sampled_from(_tensor_seeds(compression)),
        st.lists(_MUTATION, max_size=4),
        st.none() | st.lists(st.sampled_from(_UINT32_BOUNDARIES) | st.integers(0, 12), max_size=6),
        st.none() | st.sampled_from(DTYPE_NAMES) | st.text(max_size=12),
        st.none() | st.none() | st.integers(-1, 8),
        st.booleans(),
    )


def _delimited(messages: Sequence[bytes]) -> bytes:
    return b"".join(len(m).to_bytes(4, "little") + m for m in messages)


def _undelimited(data: bytes) -> List[bytes]:
    """Inverse of _delimited; a trailing partial record is dropped (the stream target's own input format)."""
    parts, offset = [], 0
    while offset + 4 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        parts.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return parts


def _stream_chunks(base: runtime_pb2.Tensor, chunk_size: int, drop, duplicate, mutations) -> bytes:
    chunks = [c.SerializeToString() for c in split_for_streaming(base, chunk_size)]
    if drop is not None and chunks:
        del chunks[drop % len(chunks)]
    if duplicate is not None and chunks:
        chunks.insert(duplicate % (len(chunks) + 1), chunks[duplicate % len(chunks)])
    return _mutate(_delimited(chunks), mutations)


_LOOP: asyncio.AbstractEventLoop = None


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP


def decode_tensor_stream(data: bytes) -> List[torch.Tensor]:
    async def chunks():
        for part in _undelimited(data):
            yield [runtime_pb2.Tensor.FromString(part)]

    return _loop().run_until_complete(deserialize_tensor_stream(chunks()))


# ----------------------------------------------------------------------------------------------- msgpack / DHT values


def _nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"\x91" * depth + b"\xc0"
    if kind == "map":
        return b"\x81\xc0" * depth + b"\xc0"
    inner = msgpack.packb(None)
    # a tuple (ext 0x40) holding an array holding the next tuple; building costs depth**2 bytes of copying, and 300
    # levels were enough to crash the decoder before it was bounded
    for _ in range(min(depth, 2000)):
        payload = b"\x91" + inner
        inner = msgpack.packb(msgpack.ExtType(0x40, payload))
    return inner


_MSGPACK_OBJECTS = st.recursive(
    st.none() | st.booleans() | _MP_INT | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | _MP_INT, children, max_size=3)
    ),
    max_leaves=20,
)
_MSGPACK_SEEDS = [MSGPackSerializer.dumps(v) for v in ([1, (2, "x"), {"a": b"b"}], (None, 1.5), {3: [[]]})]
_DEEP = st.builds(_nested, st.integers(1, 100_000), st.sampled_from(["array", "map", "tuple"]))


def decode_msgpack(data: bytes) -> object:
    return MSGPackSerializer.loads(data)


def _dictionary_payload(entries, maxsize, latest, mutations) -> bytes:
    payload = msgpack.packb([maxsize, latest, entries], use_bin_type=True)
    return _mutate(payload, mutations)


_NOW = get_dht_time()
_ENTRY = st.one_of(
    st.tuples(st.text(max_size=6) | _MP_INT, st.binary(max_size=8), st.just(_NOW + 100) | st.floats()).map(list),
    st.lists(st.none() | st.text(max_size=4) | _MP_INT | st.binary(max_size=4) | st.floats(), max_size=4),
    st.tuples(st.lists(_MP_INT, max_size=2), st.binary(max_size=4), st.just(_NOW + 100)).map(list),
)
_DICTIONARY_INPUTS = st.builds(
    _dictionary_payload,
    st.lists(_ENTRY, max_size=6),
    st.sampled_from([float("inf"), 0, 1, 2**31, -1, 2**64 - 1, "x", None]),
    st.floats() | st.sampled_from([_NOW + 100, None, "x"]),
    st.lists(_MUTATION, max_size=2),
)


def decode_dictionary(data: bytes) -> object:
    """An ext-0x50 value as a peer sends it; if it decodes, it must also merge into storage and re-encode."""
    value = MSGPackSerializer.loads(msgpack.packb(msgpack.ExtType(0x50, data)))
    if isinstance(value, DictionaryDHTValue):
        storage = DHTLocalStorage()
        storage.store(DHTID.generate(), value, math.inf)
        MSGPackSerializer.dumps(value)
    return value


# ----------------------------------------------------------------------------------------------- registry


def build_targets() -> Dict[str, FuzzTarget]:
    tensor_own = (TensorDecodeError, DecodeError)
    targets = [
        FuzzTarget(
            "tensor_proto",
            decode_tensor,
            tensor_own,
            bytes_inputs([m.SerializeToString() for c in CompressionType.values() for m in _tensor_seeds(c)]),
            "runtime_pb2.Tensor bytes -> deserialize_torch_tensor (any codec)",
        )
    ]
    for name in CompressionType.keys():
        compression = CompressionType.Value(name)
        targets.append(
            FuzzTarget(
                f"codec_{name.lower()}",
                decode_tensor,
                tensor_own,
                tensor_fields(compression),
                f"{name} messages with mutated buffer / size / dtype fields -> deserialize_torch_tensor",
            )
        )
    stream_seeds = _tensor_seeds(CompressionType.NONE) + _tensor_seeds(CompressionType.BLOCKWISE_8BIT)
    targets += [
        FuzzTarget(
            "tensor_stream",
            decode_tensor_stream,
            tensor_own + (ValueError,),  # combine_from_streaming documents ValueError for chunk-order errors
            st.builds(
                _stream_chunks,
                st.sampled_from(stream_seeds),
                st.sampled_from([1, 7, 64, 4096]),
                st.none() | st.integers(0, 50),
                st.none() | st.integers(0, 50),
                st.lists(_MUTATION, max_size=3),
            ),
            "chunk lists (split_for_streaming, dropped / repeated / mutated) -> deserialize_tensor_stream",
        ),
        FuzzTarget(
            "msgpack",
            decode_msgpack,
            (MSGPackDecodeError,),
            bytes_inputs(_MSGPACK_SEEDS, _MSGPACK_OBJECTS.map(MSGPackSerializer.dumps).map(bytes), _DEEP),
            "MSGPackSerializer.loads (ext 0x40 tuples, ext 0x50 dictionaries, deep nesting)",
        ),
        FuzzTarget(
            "dictionary_value",
            decode_dictionary,
            (MSGPackDecodeError,),
            _DICTIONARY_INPUTS | bytes_inputs(_MSGPACK_SEEDS),
            "ext 0x50 payloads -> DictionaryDHTValue via MSGPackSerializer.loads, then DHTLocalStorage.store",
        ),
    ]
    from fuzz_targets_p2p import p2p_targets  # DHT RPCs, framing, p2pd control, shm pipes (imports this module)

    targets += p2p_targets()
    return {t.name: t for t in targets}
