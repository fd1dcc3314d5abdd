"""Pure parts of the p2p layer: varints, stream frames, peer ids, identity files, daemon arguments, servicers."""

import asyncio
import hashlib
import os
import stat
from typing import AsyncIterable, AsyncIterator

import base58
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemind.p2p import P2P, P2PContext, PeerID, PeerInfo, ServicerBase, framing
from hivemind.p2p.daemon_args import build_daemon_args, check_announce_maddrs
from hivemind.p2p.daemon_process import describe_output_line, golog_level_for
from hivemind.p2p.identity import generate_identity, load_identity_peer_id
from hivemind.p2p.p2p_daemon_bindings.control import (
    DEFAULT_MAX_MSG_SIZE,
    MAX_UNARY_PAYLOAD_SIZE,
    unix_maddr_bytes,
    unix_socket_path,
)
from hivemind.p2p.p2p_daemon_bindings.utils import (
    ControlFailure,
    DispatchFailure,
    P2PDaemonError,
    decode_varint,
    encode_varint,
    raise_if_failed,
    read_unsigned_varint,
)
from hivemind.p2p.servicer import get_handle_name, inspect_rpc_method
from hivemind.proto import crypto_pb2, p2pd_pb2, test_pb2
from hivemind.utils.multiaddr import Multiaddr


def make_reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


class CollectingWriter:
    """Just enough of asyncio.StreamWriter for the framing helpers."""

    def __init__(self):
        self.chunks = []

    def write(self, data):
        self.chunks.append(bytes(data))

    async def drain(self):
        pass

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


# ------------------------------------------------------------------------------------------------ varints


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (2**64 - 1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_varint_matches_leb128(value, encoded):
    assert encode_varint(value) == encoded
    assert decode_varint(encoded) == (value, len(encoded))


def test_varint_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        encode_varint(-1)
    with pytest.raises(ValueError):
        encode_varint(2**64)


def test_varint_decoding_rejects_truncated_and_overlong_input():
    with pytest.raises(ValueError, match="truncated"):
        decode_varint(b"\x80\x80")
    with pytest.raises(ValueError):
        decode_varint(b"\xff" * 11)


async def test_varint_read_from_stream_stops_after_the_varint():
    reader = make_reader(encode_varint(4194304) + b"rest")
    assert await read_unsigned_varint(reader) == 4194304
    assert await reader.read() == b"rest"


async def test_varint_read_from_stream_raises_on_eof():
    with pytest.raises(asyncio.IncompleteReadError):
        await read_unsigned_varint(make_reader(b"\x80"))


def test_daemon_error_response_becomes_control_failure():
    response = p2pd_pb2.Response(type=p2pd_pb2.Response.ERROR, error=p2pd_pb2.ErrorResponse(msg="boom"))
    with pytest.raises(ControlFailure, match="boom"):
        raise_if_failed(response)
    raise_if_failed(p2pd_pb2.Response(type=p2pd_pb2.Response.OK))
    assert issubclass(ControlFailure, P2PDaemonError) and issubclass(DispatchFailure, P2PDaemonError)


def test_size_constants():
    assert DEFAULT_MAX_MSG_SIZE == 4 * 1024**2
    assert MAX_UNARY_PAYLOAD_SIZE == 2 * 1024**2


# ------------------------------------------------------------------------------------------------ frames


def test_frame_layout_is_marker_then_big_endian_length():
    message = test_pb2.TestRequest(number=300)
    payload = message.SerializeToString()
    assert framing.encode_frame(message) == b"\x00" + len(payload).to_bytes(8, "big") + payload
    assert framing.encode_frame(p2pd_pb2.RPCError(message="x")) == b"\x01" + (3).to_bytes(8, "big") + b"\x0a\x01x"


def test_end_of_stream_is_an_empty_error_frame():
    assert framing.END_OF_STREAM_FRAME == bytes.fromhex("010000000000000000")
    assert framing.encode_frame(P2P.END_OF_STREAM) == framing.END_OF_STREAM_FRAME


def test_p2p_class_constants():
    assert (P2P.HEADER_LEN, P2P.BYTEORDER, P2P.MESSAGE_MARKER, P2P.ERROR_MARKER) == (8, "big", b"\x00", b"\x01")
    assert P2P.DHT_MODE_MAPPING["server"] == {"dhtServer": 1}
    assert P2P.FORCE_REACHABILITY_MAPPING["private"] == {"forceReachabilityPrivate": 1}


def test_unknown_marker_is_a_framing_error():
    with pytest.raises(framing.FramingError, match="marker"):
        framing.decode_header(b"\x02" + bytes(8))


def test_impossible_frame_length_is_rejected_before_reading():
    with pytest.raises(framing.FramingError, match="announces"):
        framing.decode_header(b"\x00" + (2**40).to_bytes(8, "big"))


async def test_protobuf_frames_round_trip_through_a_stream():
    writer = CollectingWriter()
    messages = [test_pb2.TestRequest(number=i) for i in range(3)] + [test_pb2.TestRequest(number=0)]
    for message in messages:
        await framing.send_protobuf(message, writer)
    await framing.send_protobuf(P2P.END_OF_STREAM, writer)
    reader = make_reader(writer.data)
    for message in messages:
        assert await framing.receive_protobuf(test_pb2.TestRequest, reader) == (message, None)
    received, error = await framing.receive_protobuf(test_pb2.TestRequest, reader)
    assert received is None and error == p2pd_pb2.RPCError()
    with pytest.raises(asyncio.IncompleteReadError):
        await framing.receive_protobuf(test_pb2.TestRequest, reader)


async def test_large_payload_is_written_without_joining_header_and_payload():
    writer = CollectingWriter()
    data = os.urandom(framing.JOIN_WRITE_THRESHOLD * 2)
    await framing.send_raw_data(data, writer)
    assert writer.chunks == [len(data).to_bytes(8, "big"), data]
    assert await framing.receive_raw_data(make_reader(writer.data)) == data


async def test_stream_ending_inside_a_frame_is_a_framing_error():
    frame = framing.encode_frame(test_pb2.TestRequest(number=5))
    with pytest.raises(framing.FramingError, match="inside a frame"):
        await framing.receive_protobuf(test_pb2.TestRequest, make_reader(frame[:-1]))
    with pytest.raises(framing.FramingError, match="header"):
        await framing.receive_protobuf(test_pb2.TestRequest, make_reader(frame[:4]))


# ------------------------------------------------------------------------------------------------ peer ids

PEER_B58 = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_peer_id_base58_and_bytes_round_trip():
    peer_id = PeerID.from_base58(PEER_B58)
    assert peer_id.to_base58() == peer_id.pretty() == peer_id.to_string() == str(peer_id) == PEER_B58
    assert PeerID(peer_id.to_bytes()) == peer_id
    assert peer_id.to_bytes() == base58.b58decode(PEER_B58)


def test_peer_id_equals_its_base58_and_bytes_and_is_hashable():
    peer_id = PeerID.from_base58(PEER_B58)
    assert peer_id == PEER_B58 and peer_id == peer_id.to_bytes()
    assert peer_id != "Qm" and peer_id != 42
    assert {peer_id: 1}[PeerID(peer_id.to_bytes())] == 1


def test_peer_ids_order_by_base58():
    first, second = sorted(
        [PeerID.from_base58(PEER_B58), PeerID.from_base58("QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN")]
    )
    assert first.to_base58() < second.to_base58()
    assert first < second and not second < first


def test_invalid_base58_peer_id_is_a_value_error():
    with pytest.raises(ValueError, match="base58"):
        PeerID.from_base58("not-base58-0OIl")


def test_peer_info_str_lists_addresses():
    info = PeerInfo(PeerID.from_base58(PEER_B58), [Multiaddr("/ip4/1.2.3.4/tcp/5"), Multiaddr("/ip4/1.2.3.4/udp/6")])
    assert str(info) == f"{PEER_B58} /ip4/1.2.3.4/tcp/5,/ip4/1.2.3.4/udp/6"


def test_rsa_identity_peer_id_is_sha256_multihash_of_public_key(tmp_path):
    path = str(tmp_path / "identity")
    generate_identity(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    with open(path, "rb") as file:
        data = file.read()
    key = crypto_pb2.PrivateKey.FromString(data)
    assert key.key_type == crypto_pb2.RSA
    private_key = serialization.load_der_private_key(key.data, password=None)
    assert private_key.key_size == 2048 and private_key.public_key().public_numbers().e == 65537
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    serialized_public = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    expected = b"\x12\x20" + hashlib.sha256(serialized_public).digest()
    assert PeerID.from_identity(data).to_bytes() == expected == load_identity_peer_id(path).to_bytes()
    assert PeerID.from_identity(data).to_base58().startswith("Qm")


def test_ed25519_identity_peer_id_inlines_the_public_key():
    private_key = ed25519.Ed25519PrivateKey.generate()
    seed = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=seed + public).SerializeToString()
    serialized_public = crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=public).SerializeToString()
    peer_id = PeerID.from_identity(data)
    assert peer_id.to_bytes() == b"\x00" + bytes([len(serialized_public)]) + serialized_public
    assert peer_id.to_base58().startswith("12D3KooW")


def test_generate_identity_refuses_to_overwrite(tmp_path):
    path = str(tmp_path / "identity")
    generate_identity(path)
    with pytest.raises(FileExistsError, match="already exists"):
        P2P.generate_identity(path)


def test_corrupt_identity_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "identity"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="identity"):
        load_identity_peer_id(str(path))


# ------------------------------------------------------------------------------------------------ daemon args


def test_default_daemon_command_line_follows_wire_order():
    args = build_daemon_args(control_maddr="/unix/tmp/hivemind-p2pd-abc.sock")
    assert args == [
        "-autoRelay=0",
        "-autonat=1",
        "-b=0",
        "-connManager=1",
        "-idleTimeout=30s",
        "-listen=/unix/tmp/hivemind-p2pd-abc.sock",
        "-natPortMap=1",
        "-relay=1",
        "-relayHopLimit=0",
        "-tls=1",
        "-persistentConnMaxMsgSize=4194304",
        "-dhtServer=1",
        "-hostAddrs=/ip4/127.0.0.1/tcp/0",
    ]


def test_daemon_command_line_with_every_option():
    args = build_daemon_args(
        control_maddr="/unix/tmp/x.sock",
        initial_peers=["/ip4/1.2.3.4/tcp/5/p2p/" + PEER_B58, "/ip4/1.2.3.4/tcp/6/p2p/" + PEER_B58],
        announce_maddrs=["/ip4/8.8.8.8/tcp/1000"],
        auto_nat=False,
        conn_manager=False,
        dht_mode="client",
        force_reachability="public",
        host_maddrs=["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"],
        identity_path="/tmp/id.key",
        idle_timeout=5,
        nat_port_map=False,
        relay_hop_limit=3,
        tls=False,
        use_auto_relay=True,
        use_relay=False,
        max_msg_size=1024,
        no_listen=True,
        trusted_relays=["/ip4/9.9.9.9/tcp/1/p2p/" + PEER_B58],
    )
    assert args == [
        "-autoRelay=1",
        "-autonat=0",
        "-b=1",
        "-connManager=0",
        "-idleTimeout=5s",
        "-listen=/unix/tmp/x.sock",
        "-natPortMap=0",
        "-relay=0",
        "-relayHopLimit=3",
        "-tls=0",
        "-persistentConnMaxMsgSize=1024",
        "-dhtClient=1",
        "-forceReachabilityPublic=1",
        f"-bootstrapPeers=/ip4/1.2.3.4/tcp/5/p2p/{PEER_B58},/ip4/1.2.3.4/tcp/6/p2p/{PEER_B58}",
        "-hostAddrs=/ip4/0.0.0.0/tcp/0,/ip4/0.0.0.0/udp/0/quic-v1",
        "-announceAddrs=/ip4/8.8.8.8/tcp/1000",
        f"-trustedRelays=/ip4/9.9.9.9/tcp/1/p2p/{PEER_B58}",
        "-noListenAddrs=1",
        "-id=/tmp/id.key",
    ]


def test_use_ipfs_enables_bootstrap_and_dht_auto_mode():
    args = build_daemon_args(control_maddr="/unix/tmp/x.sock", use_ipfs=True, dht_mode="auto")
    assert "-b=1" in args and "-dht=1" in args and not any(a.startswith("-bootstrapPeers") for a in args)


def test_invalid_modes_are_rejected():
    with pytest.raises(ValueError, match="dht_mode"):
        build_daemon_args(control_maddr="/unix/tmp/x.sock", dht_mode="full")
    with pytest.raises(ValueError, match="force_reachability"):
        build_daemon_args(control_maddr="/unix/tmp/x.sock", force_reachability="maybe")


def test_announce_maddr_with_port_zero_is_rejected():
    with pytest.raises(ValueError, match="port 0"):
        check_announce_maddrs(["/ip4/1.2.3.4/tcp/0"])
    check_announce_maddrs(["/ip4/1.2.3.4/tcp/31337", "/ip4/1.2.3.4/udp/31337/quic-v1"])


def test_unix_socket_multiaddr_encoding_keeps_the_absolute_path():
    maddr = Multiaddr("/unix/tmp/hivemind-p2pclient-abc.sock")
    assert unix_socket_path(maddr) == "/tmp/hivemind-p2pclient-abc.sock"
    path = b"/tmp/hivemind-p2pclient-abc.sock"
    assert unix_maddr_bytes("/tmp/hivemind-p2pclient-abc.sock") == b"\x90\x03" + bytes([len(path)]) + path


@pytest.mark.parametrize(
    "level, golog", [(10, "DEBUG"), (20, "INFO"), (30, "WARN"), (40, "ERROR"), (50, "FATAL"), (25, "INFO")]
)
def test_golog_level_follows_python_level(level, golog):
    assert golog_level_for(level).upper() == golog


def test_golog_json_lines_are_summarized():
    line = '{"level":"error","ts":"x","logger":"p2pd","msg":"listening failed","error":"bind: address in use"}'
    assert describe_output_line(line) == "listening failed (error=bind: address in use)"
    assert describe_output_line("plain text") == "plain text"


# ------------------------------------------------------------------------------------------------ servicers


class ExampleServicer(ServicerBase):
    async def rpc_unary(self, request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse: ...

    async def rpc_stream_out(
        self, request: test_pb2.TestRequest, context: P2PContext
    ) -> AsyncIterator[test_pb2.TestResponse]:
        yield test_pb2.TestResponse()

    async def rpc_stream_in(
        self, requests: AsyncIterable[test_pb2.TestRequest], context: P2PContext
    ) -> test_pb2.TestResponse: ...

    async def not_an_rpc(self, request: int, context: P2PContext) -> int: ...


def test_servicer_handlers_are_found_by_prefix_with_their_stream_kinds():
    handlers = {h.name: h for h in ExampleServicer._get_rpc_handlers()}
    assert set(handlers) == {"rpc_unary", "rpc_stream_out", "rpc_stream_in"}
    assert (handlers["rpc_unary"].stream_input, handlers["rpc_unary"].stream_output) == (False, False)
    assert (handlers["rpc_stream_out"].stream_input, handlers["rpc_stream_out"].stream_output) == (False, True)
    assert (handlers["rpc_stream_in"].stream_input, handlers["rpc_stream_in"].stream_output) == (True, False)
    assert handlers["rpc_stream_in"].request_type is test_pb2.TestRequest
    assert handlers["rpc_stream_out"].response_type is test_pb2.TestResponse


def test_handle_names_follow_wire_convention():
    assert get_handle_name(None, "DHTProtocol", "rpc_find") == "DHTProtocol.rpc_find"
    assert (
        get_handle_name("myrun_grad_averager", "GradientAverager", "rpc_join_group")
        == "myrun_grad_averager::GradientAverager.rpc_join_group"
    )


def test_rpc_without_annotations_is_rejected():
    async def rpc_bad(self, request, context): ...

    with pytest.raises(ValueError, match="annotations"):
        inspect_rpc_method(ExampleServicer, "rpc_bad", rpc_bad)


def test_rpc_with_too_few_parameters_is_rejected():
    async def rpc_bad(self, request: test_pb2.TestRequest) -> test_pb2.TestResponse: ...

    with pytest.raises(ValueError, match="positional"):
        inspect_rpc_method(ExampleServicer, "rpc_bad", rpc_bad)


def test_subclass_stub_uses_the_subclass_name():
    class Derived(ExampleServicer):
        pass

    ExampleServicer._get_stub_type()
    assert Derived._get_stub_type() is not ExampleServicer._get_stub_type()
    assert Derived._get_stub_type().__name__ == "DerivedStub"
