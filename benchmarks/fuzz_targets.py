"""Fuzz targets for benchmarks/fuzz_decoders.py: every decoder that reads bytes a remote peer (or p2pd) controls.

A target is a decoder that takes ``bytes`` (what would arrive on the wire), the exception types that are its own
way to refuse input, and a hypothesis strategy that generates inputs: random bytes, valid encodings with byte-level
mutations (flips, insertions, deletions, truncations, planted boundary integers), and structured inputs built from
fields with boundary values. Any other exception escaping the decoder is a finding, as are crashes and hangs.
"""

from __future__ import annotations

import asyncio
import math
import mmap
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import msgpack
import torch
from google.protobuf.message import DecodeError
from hypothesis import strategies as st
from multiaddr.exceptions import Error as MultiaddrError

from hivemind.compression import (
    TensorDecodeError,
    deserialize_tensor_stream,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.request_checks import RequestRejected
from hivemind.dht.routing import DHTID, RoutingTable
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.framing import FramingError, encode_frame, receive_protobuf
from hivemind.p2p.p2p_daemon_bindings import shm_pipe
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerInfo, StreamInfo
from hivemind.p2p.p2p_daemon_bindings.streams import DirectStreamReader
from hivemind.p2p.p2p_daemon_bindings.utils import (
    P2PDaemonError,
    decode_varint,
    raise_if_failed,
    read_delimited_bytes,
    serialize_delimited,
)
from hivemind.proto import dht_pb2, p2pd_pb2, runtime_pb2
from hivemind.utils.multiaddr import Multiaddr
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
    for _ in range(depth):  # a tuple (ext 0x40) holding an array holding the next tuple
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


# ----------------------------------------------------------------------------------------------- DHT RPCs


class _Protocol(DHTProtocol):
    """A DHTProtocol without networking: its request handlers and response parsers only."""

    def __init__(self):
        self.node_id = DHTID.generate()
        self.client_mode, self.bucket_size, self.num_replicas = False, 20, 5
        self.routing_table = RoutingTable(self.node_id, bucket_size=20, depth_modulo=5)
        self.storage, self.cache = DHTLocalStorage(), DHTLocalStorage(maxsize=1000)
        self.record_validator, self.authorizer, self.rpc_semaphore = None, None, None
        import collections

        from hivemind.dht.id_codec import IdCodec
        from hivemind.dht.rate_limit import PeerRateLimiter

        self.rejected, self._background_tasks, self._codec = collections.Counter(), set(), IdCodec()
        self.store_rate_limiter = PeerRateLimiter()
        self.node_info = dht_pb2.NodeInfo(node_id=self.node_id.to_bytes())


_PROTOCOL: _Protocol = None
_REMOTE = PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes(range(32)))


def _protocol() -> _Protocol:
    global _PROTOCOL
    if _PROTOCOL is None or len(_PROTOCOL.storage) > 10_000:
        _PROTOCOL = _Protocol()
    return _PROTOCOL


def decode_store_request(data: bytes) -> object:
    """rpc_store then rpc_find of the same keys (stored data must be readable); the sender is in client mode."""
    request = dht_pb2.StoreRequest.FromString(data)
    request.peer.node_id = b""  # no routing-table update (that would ping the sender over the network)
    protocol, context = _protocol(), P2PContext(handle_name="fuzz", local_id=_REMOTE, remote_id=_REMOTE)
    protocol.store_rate_limiter = type(protocol.store_rate_limiter)()
    response = _loop().run_until_complete(protocol.rpc_store(request, context))
    keys = [key for key, ok in zip(request.keys, response.store_ok) if ok]
    find = dht_pb2.FindRequest(keys=keys)
    return _loop().run_until_complete(protocol.rpc_find(find, context))


def _store_request(items, mutations) -> bytes:
    request = dht_pb2.StoreRequest(peer=dht_pb2.NodeInfo())
    for key, subkey, value, expiration, in_cache in items:
        request.keys.append(key)
        request.subkeys.append(subkey)
        request.values.append(value)
        request.expiration_time.append(expiration)
        request.in_cache.append(in_cache)
    return _mutate(request.SerializeToString(), mutations)


_SUBKEYS = st.sampled_from([b"\xc0", b"", MSGPackSerializer.dumps("sub"), MSGPackSerializer.dumps(7)]) | st.binary(
    max_size=8
)
_VALUES = st.sampled_from([MSGPackSerializer.dumps(1), b"\xc0[signature:x]"]) | mutated(_MSGPACK_SEEDS) | _DEEP
_STORE_INPUTS = st.builds(
    _store_request,
    st.lists(
        st.tuples(
            st.binary(min_size=20, max_size=20) | st.binary(max_size=24),
            _SUBKEYS,
            _VALUES | _DICTIONARY_INPUTS.map(lambda p: msgpack.packb(msgpack.ExtType(0x50, p))),
            st.sampled_from([_NOW + 60, _NOW - 60, math.inf, math.nan, -math.inf, 1e300]) | st.floats(),
            st.booleans(),
        ),
        max_size=5,
    ),
    st.lists(_MUTATION, max_size=2),
)


def decode_find_response(data: bytes) -> object:
    response = dht_pb2.FindResponse.FromString(data)
    protocol, now = _protocol(), get_dht_time()
    return [protocol._parse_find_result(DHTID.generate(), result, now) for result in response.results]


def _find_response(results, mutations) -> bytes:
    response = dht_pb2.FindResponse()
    for result_type, value, expiration, node_ids, peer_ids in results:
        result = response.results.add(type=result_type, value=value, expiration_time=expiration)
        result.nearest_node_ids.extend(node_ids)
        result.nearest_peer_ids.extend(peer_ids)
    return _mutate(response.SerializeToString(), mutations)


_FIND_INPUTS = st.builds(
    _find_response,
    st.lists(
        st.tuples(
            st.integers(0, 3),
            _VALUES | _DICTIONARY_INPUTS.map(lambda p: msgpack.packb(msgpack.ExtType(0x50, p))),
            st.sampled_from([_NOW + 60, math.inf, math.nan, -1.0]),
            st.lists(st.binary(min_size=20, max_size=20) | st.binary(max_size=24), max_size=3),
            st.lists(st.just(_REMOTE.to_bytes()) | st.binary(max_size=40), max_size=3),
        ),
        max_size=3,
    ),
    st.lists(_MUTATION, max_size=2),
)

# ----------------------------------------------------------------------------------------------- stream framing

FRAMING_CHUNK = 4096


def decode_frames(data: bytes) -> list:
    """Feed the bytes to the real DirectStreamReader in chunks (so large reads take the direct path) and read frames
    until the stream ends."""

    async def run():
        reader = DirectStreamReader(limit=2**16, loop=asyncio.get_running_loop())

        async def feed():
            for start in range(0, len(data), FRAMING_CHUNK):
                reader.feed_data(data[start : start + FRAMING_CHUNK])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.ensure_future(feed())
        messages = []
        try:
            while True:
                messages.append(await receive_protobuf(dht_pb2.FindRequest, reader))
        except asyncio.IncompleteReadError:
            return messages
        finally:
            await feeder

    return _loop().run_until_complete(run())


_FRAME_SEEDS = [
    encode_frame(dht_pb2.FindRequest(keys=[bytes(20)])) + encode_frame(dht_pb2.FindRequest()),
    encode_frame(p2pd_pb2.RPCError(message="boom")),
    b"\x00" + (2**30).to_bytes(8, "big") + b"x" * 100,  # a header announcing 1 GiB
]

# ----------------------------------------------------------------------------------------------- p2pd control channel


def decode_control(data: bytes) -> list:
    """Varint-delimited messages as p2pd sends them; each is parsed as the message kind chosen by the first byte."""
    kinds = [p2pd_pb2.Response, p2pd_pb2.StreamInfo, p2pd_pb2.PersistentConnectionResponse]

    async def run():
        reader = asyncio.StreamReader(limit=2**16, loop=asyncio.get_running_loop())
        reader.feed_data(data[1:])
        reader.feed_eof()
        out = []
        while not reader.at_eof():
            payload = await read_delimited_bytes(reader, 4 * 2**20)
            kind = kinds[(data[0] if data else 0) % len(kinds)]
            message = kind.FromString(payload)
            if kind is p2pd_pb2.Response:
                raise_if_failed(message)
                out.append([PeerInfo.from_protobuf(peer) for peer in message.peers])
                out.append((PeerID(message.identify.id), [Multiaddr(a) for a in message.identify.addrs]))
                out.append(StreamInfo.from_protobuf(message.streamInfo))
            elif kind is p2pd_pb2.StreamInfo:
                out.append(StreamInfo.from_protobuf(message))
            else:
                which = message.WhichOneof("message")
                if which == "requestHandling":
                    out.append(PeerID(message.requestHandling.peer))
        decode_varint(data)
        return out

    return _loop().run_until_complete(run())


def _control_seed() -> List[bytes]:
    peer = _REMOTE.to_bytes()
    addr = Multiaddr("/ip4/127.0.0.1/tcp/1234").to_bytes()
    response = p2pd_pb2.Response(type=p2pd_pb2.Response.OK)
    response.peers.add(id=peer, addrs=[addr])
    response.identify.id, response.streamInfo.peer, response.streamInfo.addr = peer, peer, addr
    response.identify.addrs.append(addr)
    response.streamInfo.proto = "x"
    info = p2pd_pb2.StreamInfo(peer=peer, addr=addr, proto="x")
    call = p2pd_pb2.PersistentConnectionResponse(callId=b"1" * 16)
    call.requestHandling.peer, call.requestHandling.proto, call.requestHandling.data = peer, "p", b"d"
    return [bytes([k]) + serialize_delimited(m) for k, m in enumerate([response, info, call])]


# ----------------------------------------------------------------------------------------------- shm pipe records


class _FakeSocket:
    def __init__(self):
        self.closed = False

    def write(self, data):
        pass

    def abort(self):
        self.closed = True

    def close(self):
        self.closed = True

    def get_extra_info(self, name, default=None):
        return default


class _Sink(asyncio.BufferedProtocol):
    def __init__(self):
        self.buffer, self.received, self.lost = bytearray(1024), 0, None

    def get_buffer(self, sizehint):
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes):
        self.received += nbytes

    def eof_received(self):
        return True

    def connection_lost(self, exc):
        self.lost = exc or "clean"


RING = 4096


def decode_shm_records(data: bytes) -> object:
    """Records from p2pd, split at points chosen by the input, with app writes in between (so ACKs can be valid).

    Nothing may escape data_received: a broken record aborts the pipe and surfaces as ShmPipeError in
    connection_lost (reported as an own refusal by raising it here)."""
    memory = mmap.mmap(-1, 2 * RING)
    sink = _Sink()
    pipe = shm_pipe.ShmPipeTransport(_loop(), _FakeSocket(), "/dev/shm/none", memory, RING, sink)
    records = shm_pipe._RecordProtocol(pipe)
    step = (data[0] % 13 + 1) if data else 1
    for start in range(1, len(data), step):
        pipe.write(b"w" * (data[start] * 8 + 1))
        records.data_received(data[start : start + step])
        assert 0 <= pipe._in_announced - pipe._in_consumed <= RING, "in-ring accounting broke"
        assert 0 <= pipe._out_written - pipe._out_acked <= RING, "out-ring accounting broke"
    records.connection_lost(None)
    if isinstance(pipe._lost_exc, shm_pipe.ShmPipeError):
        raise pipe._lost_exc
    return sink.received


def _records(entries, mutations) -> bytes:
    out = bytes([3])
    for kind, value in entries:
        out += b"\x00" + shm_pipe.RECORD.pack(kind, value)
    return _mutate(out, mutations)


_RECORD_INPUTS = st.builds(
    _records,
    st.lists(
        st.tuples(st.sampled_from([b"D", b"A", b"E", b"X"]), st.sampled_from(BOUNDARY_INTS) | st.integers(0, RING)),
        max_size=20,
    ),
    st.lists(_MUTATION, max_size=2),
)

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
        FuzzTarget(
            "dht_store_request",
            decode_store_request,
            (DecodeError, RequestRejected),
            _STORE_INPUTS,
            "dht_pb2.StoreRequest bytes -> DHTProtocol.rpc_store, then rpc_find of the accepted keys",
        ),
        FuzzTarget(
            "dht_find_response",
            decode_find_response,
            (DecodeError, RequestRejected),
            _FIND_INPUTS,
            "dht_pb2.FindResponse bytes -> DHTProtocol._parse_find_result (what a caller does with an answer)",
        ),
        FuzzTarget(
            "stream_framing",
            decode_frames,
            (FramingError, DecodeError),
            bytes_inputs(_FRAME_SEEDS),
            "marker + 8-byte length frames through DirectStreamReader -> framing.receive_protobuf",
        ),
        FuzzTarget(
            "p2pd_control",
            decode_control,
            # varint errors are documented as ValueError; multiaddr's parse errors are ValueErrors too
            (P2PDaemonError, DecodeError, asyncio.IncompleteReadError, MultiaddrError, ValueError),
            bytes_inputs(_control_seed()),
            "varint-delimited p2pd Response / StreamInfo / PersistentConnectionResponse -> bindings' parsers",
        ),
        FuzzTarget(
            "shm_pipe_records",
            decode_shm_records,
            (shm_pipe.ShmPipeError,),
            _RECORD_INPUTS | st.binary(max_size=200),
            "9-byte D/A/E records from p2pd -> shm_pipe._RecordProtocol / ShmPipeTransport",
        ),
    ]
    return {t.name: t for t in targets}
