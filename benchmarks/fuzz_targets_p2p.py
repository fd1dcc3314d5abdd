"""Fuzz targets of the DHT RPCs, stream framing, the p2pd control channel and shared-memory pipe records.

Part of benchmarks/fuzz_decoders.py; the generic mutation helpers, the tensor and msgpack targets and the registry are
in fuzz_targets.py.
"""

from __future__ import annotations

import asyncio
import collections
import math
import mmap
from typing import Dict, List

import msgpack
from fuzz_targets import (
    _DEEP,
    _DICTIONARY_INPUTS,
    _MSGPACK_OBJECTS,
    _MSGPACK_SEEDS,
    _MUTATION,
    _NOW,
    BOUNDARY_INTS,
    FuzzTarget,
    _loop,
    _mutate,
    bytes_inputs,
    mutated,
)
from google.protobuf.message import DecodeError
from hypothesis import strategies as st
from multiaddr.exceptions import Error as MultiaddrError

from hivemind.dht.id_codec import IdCodec
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import PeerRateLimiter
from hivemind.dht.request_checks import RequestRejected
from hivemind.dht.routing import DHTID, RoutingTable
from hivemind.dht.schema import SchemaValidator, conbytes
from hivemind.dht.storage import DHTLocalStorage
from hivemind.dht.validation import DHTRecord
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
from hivemind.proto import dht_pb2, p2pd_pb2
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

# ----------------------------------------------------------------------------------------------- DHT RPCs


class _Protocol(DHTProtocol):
    """A DHTProtocol without networking: its request handlers and response parsers only."""

    def __init__(self):
        self.node_id = DHTID.generate()
        self.client_mode, self.bucket_size, self.num_replicas = False, 20, 5
        self.routing_table = RoutingTable(self.node_id, bucket_size=20, depth_modulo=5)
        self.storage, self.cache = DHTLocalStorage(), DHTLocalStorage(maxsize=1000)
        self.record_validator, self.authorizer, self.rpc_semaphore = None, None, None
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

# ----------------------------------------------------------------------------------------------- DHT schemas


class RecordRefused(Exception):
    """Raised by the harness when a record validator returns False (its own way of refusing a record)."""


def _schema_validators() -> List[SchemaValidator]:
    import pydantic
    from pydantic import v1 as pydantic_v1

    class Modern(pydantic.BaseModel):
        count: int
        name: str
        blob: conbytes(max_length=8)
        table: Dict[bytes, int]
        nested: Dict[str, List[float]]

    class Legacy(pydantic_v1.BaseModel):  # a schema written for hivemind 1.1 (pydantic v1 coerces)
        count: int
        name: str
        blob: bytes
        table: Dict[bytes, int]
        nested: Dict[str, List[float]]

    return [SchemaValidator(Modern, allow_extra_keys=False), SchemaValidator(Legacy, allow_extra_keys=False)]


_SCHEMA_VALIDATORS: List[SchemaValidator] = []
SCHEMA_FIELDS = ["count", "name", "blob", "table", "nested", "unknown"]


def decode_schema_record(data: bytes) -> bool:
    """[schema index, field index, subkey bytes, value bytes] -> SchemaValidator.validate: a bool, never an error."""
    if not _SCHEMA_VALIDATORS:
        _SCHEMA_VALIDATORS.extend(_schema_validators())
    schema_index, field_index, subkey, value = msgpack.unpackb(data)
    key = DHTID.generate(source=SCHEMA_FIELDS[field_index % len(SCHEMA_FIELDS)]).to_bytes()
    validator = _SCHEMA_VALIDATORS[schema_index % len(_SCHEMA_VALIDATORS)]
    if not validator.validate(DHTRecord(key, subkey, value, _NOW + 60)):
        raise RecordRefused("the validator refused the record")
    field = SCHEMA_FIELDS[field_index % len(SCHEMA_FIELDS)]
    if subkey == b"\xc0" and field in _EXPECTED_TYPES:  # an accepted value was not coerced (pydantic v1 would)
        decoded = MSGPackSerializer.loads(value)
        assert isinstance(decoded, _EXPECTED_TYPES[field]), f"{field} accepted a {type(decoded).__name__}"
    return True


_EXPECTED_TYPES = {"count": (int, float), "name": str, "blob": bytes}


def _schema_record(schema_index, field_index, subkey, value) -> bytes:
    return msgpack.packb([schema_index, field_index, subkey, value], use_bin_type=True)


_SCHEMA_INPUTS = st.builds(
    _schema_record,
    st.integers(0, 1),
    st.integers(0, len(SCHEMA_FIELDS) - 1),
    st.just(b"\xc0")
    | st.one_of(st.binary(max_size=6), st.text(max_size=6), _MSGPACK_OBJECTS).map(MSGPackSerializer.dumps)
    | st.binary(max_size=8),
    st.one_of(  # values of each field's type (and near misses) as well as anything at all
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.booleans(),
        st.text(max_size=8),
        st.binary(max_size=12),
        st.lists(st.floats() | st.integers(-10, 10), max_size=3),
        _MSGPACK_OBJECTS,
    ).map(MSGPackSerializer.dumps)
    | mutated(_MSGPACK_SEEDS)
    | _DEEP,
)


def p2p_targets() -> List[FuzzTarget]:
    return [
        FuzzTarget(
            "dht_schema",
            decode_schema_record,
            (RecordRefused,),
            _SCHEMA_INPUTS,
            "records under pydantic v2 / v1 schema keys -> SchemaValidator.validate (returns a bool, never raises)",
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
