"""The build works: generated protobuf modules, the p2pd binary, its command line, start-up and shutdown."""

import contextlib
import hashlib
import importlib
import os
import signal
import socket
import struct
import subprocess
import time

import base58
import pytest

from hivemind.p2p.daemon_binary import P2PD_PATH_ENV_VAR, get_p2pd_path, get_p2pd_version
from hivemind.p2p.p2p_daemon_bindings.utils import serialize_delimited

PROTO_MODULES = ["auth_pb2", "averaging_pb2", "crypto_pb2", "dht_pb2", "p2pd_pb2", "runtime_pb2", "test_pb2"]
STARTUP_TIMEOUT = 15


@pytest.mark.parametrize("name", PROTO_MODULES)
def test_generated_protobuf_module_imports(name):
    module = importlib.import_module(f"hivemind.proto.{name}")
    assert module.DESCRIPTOR.name == name.replace("_pb2", ".proto")


def test_daemon_binary_is_found_and_executable():
    path = get_p2pd_path()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_daemon_path_env_var_must_point_to_an_executable(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-p2pd"
    monkeypatch.setenv(P2PD_PATH_ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match=P2PD_PATH_ENV_VAR):
        get_p2pd_path()
    not_executable = tmp_path / "p2pd"
    not_executable.write_text("not a program")
    monkeypatch.setenv(P2PD_PATH_ENV_VAR, str(not_executable))
    with pytest.raises(RuntimeError, match="not an executable"):
        get_p2pd_path()


def test_daemon_version_is_one_line():
    version = get_p2pd_version()
    assert version.startswith("p2pd ") and "\n" not in version


@pytest.mark.parametrize(
    "flag",
    [
        "-persistentConnMaxMsgSize",
        "-idleTimeout",
        "-hostAddrs",
        "-announceAddrs",
        "-bootstrapPeers",
        "-dhtServer",
        "-dhtClient",
        "-forceReachabilityPublic",
        "-trustedRelays",
        "-noListenAddrs",
        "-autoRelay",
        "-relayHopLimit",
        "-natPortMap",
        "-connManager",
        "-autonat",
        "-listen",
        "-tls",
        "-noise",
        "-id",
        "-b",
    ],
)
def test_daemon_help_lists_fork_flags(flag):
    result = subprocess.run([get_p2pd_path(), "-help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    listed = {line.split()[0] for line in (result.stdout + result.stderr).splitlines() if line.startswith("  -")}
    assert flag in listed


# ------------------------------------------------------------------------------------------------ running daemons


def daemon_args(control_socket, *extra):
    return [
        get_p2pd_path(),
        f"-listen=/unix{control_socket}",
        "-hostAddrs=/ip4/127.0.0.1/tcp/0",
        "-tls=1",
        "-dhtServer=1",
        "-connManager=1",
        "-relay=1",
        "-autonat=1",
        "-natPortMap=0",
        *extra,
    ]


def start_daemon(control_socket, *extra):
    """Start p2pd; return the process, its peer id and addresses once it printed its readiness lines."""
    process = subprocess.Popen(
        daemon_args(control_socket, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = []
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Peer Addrs:"):
            address = process.stdout.readline().rstrip("\n")
            peer_id = next(x for x in lines if x.startswith("Peer ID:")).split(":", 1)[1].strip()
            return process, peer_id, [address]
    process.kill()
    _, stderr = process.communicate(timeout=5)
    raise AssertionError(f"p2pd did not become ready; stdout={lines!r}, stderr={stderr!r}")


@contextlib.contextmanager
def running_daemon(control_socket, *extra):
    """``start_daemon`` for the duration of a ``with`` block; the daemon is killed when the block ends."""
    process, peer_id, addrs = start_daemon(control_socket, *extra)
    try:
        yield process, peer_id, addrs
    finally:
        process.kill()
        process.communicate()


def run_failing_daemon(control_socket, *extra):
    result = subprocess.run(daemon_args(control_socket, *extra), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "Peer ID:" not in result.stdout
    return result.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_prints_peer_id_and_exits_cleanly_on_signal(tmp_path, sig):
    control_socket = tmp_path / "p2pd.sock"
    with running_daemon(control_socket) as (process, peer_id, addrs):
        assert len(base58.b58decode(peer_id)) >= 34
        assert addrs[0].startswith("/ip4/127.0.0.1/tcp/")
        assert control_socket.exists()
        process.send_signal(sig)
        assert process.wait(timeout=10) == 0
        assert not control_socket.exists()


@pytest.mark.timeout(30)
def test_daemon_exits_after_idle_timeout_without_persistent_connection(tmp_path):
    control_socket = tmp_path / "p2pd.sock"
    with running_daemon(control_socket, "-idleTimeout=1s") as (process, _, _):
        assert process.wait(timeout=10) == 0
        assert not control_socket.exists()


@pytest.mark.timeout(30)
def test_daemon_fails_on_occupied_tcp_port(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen(1)
        port = occupied.getsockname()[1]
        stderr = run_failing_daemon(tmp_path / "p2pd.sock", f"-hostAddrs=/ip4/127.0.0.1/tcp/{port}")
    assert "address already in use" in stderr
    assert str(port) in stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "flag, value",
    [("hostAddrs", "/ip4/127.0.0.1/tcp/not-a-port"), ("bootstrapPeers", "/ip4/300.1.2.3/tcp/1"), ("listen", "/nope")],
)
def test_daemon_fails_on_malformed_multiaddr(tmp_path, flag, value):
    stderr = run_failing_daemon(tmp_path / "p2pd.sock", f"-{flag}={value}")
    assert value in stderr and f"-{flag}" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.timeout(30)
def test_daemon_fails_on_invalid_identity_file(tmp_path):
    identity = tmp_path / "identity.key"
    identity.write_bytes(b"definitely not a private key")
    stderr = run_failing_daemon(tmp_path / "p2pd.sock", f"-id={identity}")
    assert "identity" in stderr and str(identity) in stderr


@pytest.mark.timeout(30)
def test_daemon_fails_on_bad_flag_value(tmp_path):
    stderr = run_failing_daemon(tmp_path / "p2pd.sock", "-idleTimeout=soon")
    assert "idleTimeout" in stderr


@pytest.mark.timeout(30)
def test_rsa_identity_file_gives_the_peer_id_derived_from_its_public_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from hivemind.proto import crypto_pb2

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    identity = tmp_path / "identity.key"
    identity.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=private_der).SerializeToString())
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_key = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    expected_peer_id = base58.b58encode(b"\x12\x20" + hashlib.sha256(public_key).digest()).decode()

    with running_daemon(tmp_path / "p2pd.sock", f"-id={identity}") as (process, peer_id, _):
        assert peer_id == expected_peer_id


def control_connection(control_socket) -> socket.socket:
    """A connected socket to the daemon's control socket, with a 10 s timeout on every operation."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(control_socket))
    return sock


def write_delimited(sock, message):
    sock.sendall(serialize_delimited(message))


def read_delimited(sock, message_type):
    size = shift = 0
    while True:
        byte = sock.recv(1)
        assert byte, "connection closed before a response"
        size |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed in the middle of a response"
        data += chunk
    message = message_type()
    message.ParseFromString(data)
    return message


@pytest.mark.timeout(30)
def test_raw_identify_over_control_socket_returns_the_printed_peer_id(tmp_path):
    from hivemind.proto import p2pd_pb2

    control_socket = tmp_path / "p2pd.sock"
    with running_daemon(control_socket) as (process, peer_id, addrs):
        with control_connection(control_socket) as sock:
            write_delimited(sock, p2pd_pb2.Request(type=p2pd_pb2.Request.IDENTIFY))
            response = read_delimited(sock, p2pd_pb2.Response)
        assert response.type == p2pd_pb2.Response.OK
        assert base58.b58encode(response.identify.id).decode() == peer_id
        tcp_port = int(addrs[0].rsplit("/", 1)[1])
        # binary multiaddr /ip4/127.0.0.1/tcp/<port>: 0x04 + 4 address bytes, 0x06 + 2 port bytes
        assert bytes([4, 127, 0, 0, 1, 6]) + struct.pack(">H", tcp_port) in response.identify.addrs


# ------------------------------------------------------------------- control protocol of the daemon, raw messages


class PersistentConnection:
    """A PERSISTENT_CONN_UPGRADE connection driven with raw p2pd_pb2 messages."""

    def __init__(self, control_socket):
        from hivemind.proto import p2pd_pb2

        self.pb = p2pd_pb2
        self.sock = control_connection(control_socket)
        write_delimited(self.sock, p2pd_pb2.Request(type=p2pd_pb2.Request.PERSISTENT_CONN_UPGRADE))
        assert read_delimited(self.sock, p2pd_pb2.Response).type == p2pd_pb2.Response.OK

    def send(self, call_id, **message):
        write_delimited(self.sock, self.pb.PersistentConnectionRequest(callId=call_id, **message))

    def receive(self):
        return read_delimited(self.sock, self.pb.PersistentConnectionResponse)

    def close(self):
        self.sock.close()


def new_call_id():
    return os.urandom(16)


@pytest.fixture
def two_daemons(tmp_path):
    """Daemons A and B on 127.0.0.1, B bootstrapped from A; yields (control socket, peer id bytes) pairs."""
    socket_a, socket_b = tmp_path / "a.sock", tmp_path / "b.sock"
    with running_daemon(socket_a) as (_, id_a, addrs_a):
        with running_daemon(socket_b, "-b=1", f"-bootstrapPeers={addrs_a[0]}/p2p/{id_a}") as (_, id_b, _):
            yield (socket_a, base58.b58decode(id_a)), (socket_b, base58.b58decode(id_b))


@pytest.mark.timeout(30)
def test_unary_call_reaches_the_handler_with_the_authenticated_caller_id(two_daemons):
    (socket_a, id_a), (socket_b, id_b) = two_daemons
    caller, handler = PersistentConnection(socket_a), PersistentConnection(socket_b)
    pb = caller.pb
    call_id = new_call_id()
    handler.send(call_id, addUnaryHandler=pb.AddUnaryHandlerRequest(proto="Echo.rpc_echo", balanced=False))
    assert handler.receive() == pb.PersistentConnectionResponse(callId=call_id)

    call_id = new_call_id()
    caller.send(call_id, callUnary=pb.CallUnaryRequest(peer=id_b, proto="Echo.rpc_echo", data=b"ping"))
    request = handler.receive()
    assert request.callId == call_id and request.WhichOneof("message") == "requestHandling"
    assert request.requestHandling.peer == id_a and request.requestHandling.data == b"ping"
    handler.send(call_id, unaryResponse=pb.CallUnaryResponse(response=b"pong"))
    answer = caller.receive()
    assert answer.callId == call_id and answer.callUnaryResponse.response == b"pong"


@pytest.mark.timeout(30)
def test_second_unary_handler_registration_needs_balanced(two_daemons):
    (socket_a, _), _ = two_daemons
    first, second = PersistentConnection(socket_a), PersistentConnection(socket_a)
    pb = first.pb
    first.send(b"1" * 16, addUnaryHandler=pb.AddUnaryHandlerRequest(proto="X.rpc_x", balanced=False))
    assert not first.receive().HasField("daemonError")
    second.send(b"2" * 16, addUnaryHandler=pb.AddUnaryHandlerRequest(proto="X.rpc_x", balanced=False))
    assert second.receive().daemonError.message == "handler for protocol X.rpc_x already set"
    second.send(b"3" * 16, addUnaryHandler=pb.AddUnaryHandlerRequest(proto="X.rpc_x", balanced=True))
    assert not second.receive().HasField("daemonError")


@pytest.mark.timeout(30)
def test_unary_call_of_an_unserved_protocol_fails_quickly(two_daemons):
    (socket_a, _), (_, id_b) = two_daemons
    caller = PersistentConnection(socket_a)
    started = time.monotonic()
    caller.send(new_call_id(), callUnary=caller.pb.CallUnaryRequest(peer=id_b, proto="Nobody.rpc_here", data=b""))
    answer = caller.receive()
    assert "Nobody.rpc_here" in answer.daemonError.message
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_cancelled_unary_call_cancels_the_handler(two_daemons):
    (socket_a, _), (socket_b, id_b) = two_daemons
    caller, handler = PersistentConnection(socket_a), PersistentConnection(socket_b)
    pb = caller.pb
    handler.send(new_call_id(), addUnaryHandler=pb.AddUnaryHandlerRequest(proto="Slow.rpc_slow", balanced=False))
    handler.receive()
    call_id = new_call_id()
    caller.send(call_id, callUnary=pb.CallUnaryRequest(peer=id_b, proto="Slow.rpc_slow", data=b"work"))
    assert handler.receive().WhichOneof("message") == "requestHandling"
    caller.send(call_id, cancel=pb.Cancel())
    assert caller.receive() == pb.PersistentConnectionResponse(callId=call_id, cancel=pb.Cancel())
    assert handler.receive() == pb.PersistentConnectionResponse(callId=call_id, cancel=pb.Cancel())


@pytest.mark.timeout(30)
def test_oversized_persistent_message_gets_daemon_error_and_connection_survives(tmp_path):
    control_socket = tmp_path / "p2pd.sock"
    with running_daemon(control_socket, "-persistentConnMaxMsgSize=1024") as (process, peer_id, _):
        client = PersistentConnection(control_socket)
        pb = client.pb
        call_id = new_call_id()
        too_big = pb.CallUnaryRequest(peer=base58.b58decode(peer_id), proto="Big.rpc_big", data=b"x" * 4096)
        client.send(call_id, callUnary=too_big)
        answer = client.receive()
        assert answer.callId == call_id and "1024" in answer.daemonError.message
        client.send(b"n" * 16, addUnaryHandler=pb.AddUnaryHandlerRequest(proto="Big.rpc_big", balanced=False))
        assert client.receive() == pb.PersistentConnectionResponse(callId=b"n" * 16)


@pytest.mark.timeout(30)
def test_malformed_control_message_does_not_crash_the_daemon(tmp_path):
    from hivemind.proto import p2pd_pb2

    control_socket = tmp_path / "p2pd.sock"
    with running_daemon(control_socket) as (process, peer_id, _):
        for garbage in [b"\x05\xff\xff\xff\xff\xff", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x02\x08"]:
            with control_connection(control_socket) as sock:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
        with control_connection(control_socket) as sock:
            write_delimited(sock, p2pd_pb2.Request(type=p2pd_pb2.Request.IDENTIFY))
            assert base58.b58encode(read_delimited(sock, p2pd_pb2.Response).identify.id).decode() == peer_id
        assert process.poll() is None


@pytest.mark.timeout(30)
def test_daemon_exits_when_the_last_persistent_connection_closes(tmp_path):
    control_socket = tmp_path / "p2pd.sock"
    with running_daemon(control_socket, "-idleTimeout=30s") as (process, _, _):
        first, second = PersistentConnection(control_socket), PersistentConnection(control_socket)
        first.close()
        time.sleep(0.5)
        assert process.poll() is None
        second.close()
        assert process.wait(timeout=10) == 0
        assert not control_socket.exists()


@pytest.mark.timeout(30)
def test_sigint_waits_for_connected_clients_to_disconnect(tmp_path):
    control_socket = tmp_path / "p2pd.sock"
    with running_daemon(control_socket) as (process, _, _):
        client = PersistentConnection(control_socket)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert process.poll() is None  # Ctrl-C reaches the owner too; it still needs its daemon to shut down
        client.close()
        assert process.wait(timeout=10) == 0


@pytest.mark.timeout(30)
def test_oversized_handler_response_reaches_the_caller_as_an_error(tmp_path):
    socket_a, socket_b = tmp_path / "a.sock", tmp_path / "b.sock"
    with running_daemon(socket_a) as (_, id_a, addrs_a):
        limited = ("-persistentConnMaxMsgSize=1024", "-b=1", f"-bootstrapPeers={addrs_a[0]}/p2p/{id_a}")
        with running_daemon(socket_b, *limited) as (_, id_b, _):
            caller, handler = PersistentConnection(socket_a), PersistentConnection(socket_b)
            pb = caller.pb
            handler.send(new_call_id(), addUnaryHandler=pb.AddUnaryHandlerRequest(proto="Big.rpc_big", balanced=False))
            handler.receive()
            call_id = new_call_id()
            request = pb.CallUnaryRequest(peer=base58.b58decode(id_b), proto="Big.rpc_big", data=b"")
            caller.send(call_id, callUnary=request)
            assert handler.receive().callId == call_id
            handler.send(call_id, unaryResponse=pb.CallUnaryResponse(response=b"x" * 4096))
            assert "1024" in handler.receive().daemonError.message
            answer = caller.receive()
            assert answer.callId == call_id and b"rejected" in answer.callUnaryResponse.error
