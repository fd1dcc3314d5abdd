"""Raw stream throughput through two local p2pd daemons (A -> libp2p/TCP/TLS/yamux -> B), with minimal client cost.

The sender opens a stream with STREAM_OPEN on daemon A and writes --total MiB in --chunk MiB writes; daemon B hands
the stream to a unix-socket handler that counts the bytes. Blocking sockets and recv_into keep the Python side
cheap, so the figure is close to what the daemons themselves can move. Usage (from the repository root):

    python p2pd/tools/throughput.py [--binary PATH] [--total 1024] [--chunk 1] [--repeat 3] [-- extra p2pd flags]
"""

import argparse
import os
import socket
import subprocess
import tempfile
import threading
import time

import base58

from hivemind.p2p.daemon_binary import get_p2pd_path
from hivemind.p2p.p2p_daemon_bindings.control import unix_maddr_bytes
from hivemind.p2p.p2p_daemon_bindings.utils import serialize_delimited
from hivemind.proto import p2pd_pb2


def send_message(sock: socket.socket, message) -> None:
    sock.sendall(serialize_delimited(message))


def receive_message(sock: socket.socket, message_type):
    size = shift = 0
    while True:
        byte = sock.recv(1)[0]
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    data = bytearray()
    while len(data) < size:
        data += sock.recv(size - len(data))
    message = message_type()
    message.ParseFromString(bytes(data))
    return message


def start_daemon(binary, control_path, extra):
    args = [binary, f"-listen=/unix{control_path}", "-hostAddrs=/ip4/127.0.0.1/tcp/0", "-tls=1", *extra]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    peer_id = None
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"p2pd exited: {args}")
        if line.startswith("Peer ID:"):
            peer_id = line.split(":", 1)[1].strip()
        if line.startswith("Peer Addrs:"):
            return process, peer_id, process.stdout.readline().strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=None, help="p2pd binary (default: the packaged one)")
    parser.add_argument("--total", type=int, default=1024, help="MiB per transfer")
    parser.add_argument("--chunk", type=int, default=1, help="MiB per write")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="extra flags for both daemons")
    args = parser.parse_args()
    binary = args.binary or get_p2pd_path()
    total, chunk = args.total << 20, args.chunk << 20

    workdir = tempfile.mkdtemp(prefix="p2pd-throughput-")
    control_a, control_b, handler_path = (os.path.join(workdir, name) for name in ("a.sock", "b.sock", "h.sock"))
    daemon_a, id_a, addr_a = start_daemon(binary, control_a, args.extra)
    daemon_b, id_b, _ = start_daemon(binary, control_b, ["-b=1", f"-bootstrapPeers={addr_a}/p2p/{id_a}", *args.extra])
    try:
        handler = socket.socket(socket.AF_UNIX)
        handler.bind(handler_path)
        handler.listen(4)
        with socket.socket(socket.AF_UNIX) as control:
            control.connect(control_b)
            handler_addr = unix_maddr_bytes(handler_path)
            request = p2pd_pb2.StreamHandlerRequest(addr=handler_addr, proto=["throughput"], balanced=False)
            send_message(control, p2pd_pb2.Request(type=p2pd_pb2.Request.STREAM_HANDLER, streamHandler=request))
            assert receive_message(control, p2pd_pb2.Response).type == p2pd_pb2.Response.OK

        received = []

        def receive():
            conn, _ = handler.accept()
            receive_message(conn, p2pd_pb2.StreamInfo)
            buffer = memoryview(bytearray(4 << 20))
            count = 0
            while count < total:
                n = conn.recv_into(buffer)
                if not n:
                    break
                count += n
            conn.sendall(b"k")
            conn.close()
            received.append(count)

        payload = os.urandom(chunk)
        print(f"{'MiB':>6} {'seconds':>8} {'MB/s':>7}")
        for _ in range(args.repeat):
            thread = threading.Thread(target=receive)
            thread.start()
            with socket.socket(socket.AF_UNIX) as stream:
                stream.connect(control_a)
                request = p2pd_pb2.StreamOpenRequest(peer=base58.b58decode(id_b), proto=["throughput"])
                send_message(stream, p2pd_pb2.Request(type=p2pd_pb2.Request.STREAM_OPEN, streamOpen=request))
                assert receive_message(stream, p2pd_pb2.Response).type == p2pd_pb2.Response.OK
                started = time.perf_counter()
                for _ in range(total // chunk):
                    stream.sendall(payload)
                stream.recv(1)
                elapsed = time.perf_counter() - started
            thread.join()
            print(f"{received[-1] >> 20:>6} {elapsed:>8.3f} {received[-1] / elapsed / 1e6:>7.0f}")
    finally:
        for daemon in (daemon_a, daemon_b):
            daemon.terminate()
            daemon.wait()


if __name__ == "__main__":
    main()
