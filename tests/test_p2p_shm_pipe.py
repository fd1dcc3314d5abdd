"""Shared-memory stream pipes (p2pd/shmpipe.go, hivemind/p2p/p2p_daemon_bindings/shm_pipe.py).

The first tests play p2pd's side of the pipe protocol by hand over a real unix socket and a real /dev/shm file, so
that every record can be checked (or broken on purpose); the others run streams between real daemons.
"""

import asyncio
import contextlib
import glob
import hashlib
import mmap
import os
import signal
import struct
import sys

import pytest
from unix_socket_pair import LOOPS, connected_pair, run_in_loop

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings import shm_pipe
from hivemind.proto import p2pd_pb2

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared-memory pipes are Linux-only"),
]

RING = 4096  # the smallest ring a client accepts: wraps around often
RECORD = struct.Struct("<cQ")


class FakeDaemonSide:
    """p2pd's end of one pipe: the file, its mapping and the raw socket records."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ring_size: int = RING):
        self.path = f"/dev/shm/{shm_pipe.PIPE_NAME_PREFIX}{os.getpid()}-test{os.urandom(6).hex()}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.posix_fallocate(fd, 0, 2 * ring_size)  # reserved, as p2pd does: the client declines sparse files
        self.memory = mmap.mmap(fd, 2 * ring_size)
        os.close(fd)
        self.ring_size = ring_size
        self.up = memoryview(self.memory)[:ring_size]  # client -> daemon
        self.down = memoryview(self.memory)[ring_size:]  # daemon -> client
        self.reader, self.writer = reader, writer
        self.up_read = self.down_written = 0

    def offer(self) -> p2pd_pb2.StreamInfo:
        return p2pd_pb2.StreamInfo(
            peer=b"x", addr=b"y", proto="test", shm_path=self.path, shm_ring_size=self.ring_size
        )

    def send(self, data: bytes) -> None:
        start = self.down_written % self.ring_size
        assert len(data) <= self.ring_size - start, "the test keeps each send within the ring's end"
        self.down[start : start + len(data)] = data
        self.down_written += len(data)
        self.writer.write(RECORD.pack(b"D", len(data)))

    async def record(self):
        return RECORD.unpack(await self.reader.readexactly(RECORD.size))

    async def receive(self, n: int) -> bytes:
        start = self.up_read % self.ring_size
        data = (
            bytes(self.up[start : start + n])
            if start + n <= self.ring_size
            else (bytes(self.up[start:]) + bytes(self.up[: n - (self.ring_size - start)]))
        )
        self.up_read += n
        self.writer.write(RECORD.pack(b"A", n))
        return data

    def close(self) -> None:
        self.up.release()
        self.down.release()
        self.memory.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


@contextlib.asynccontextmanager
async def pipe_pair(tmp_path, ring_size: int = RING):
    """(client reader, client writer, fake daemon side) with the pipe accepted by the client; closed on exit."""
    async with connected_pair(str(tmp_path / "s.sock"), limit=2**16) as (
        (reader, writer),
        (daemon_reader, daemon_writer),
    ):
        daemon = FakeDaemonSide(daemon_reader, daemon_writer, ring_size)
        try:
            reader, writer = shm_pipe.accept_shm_pipe(daemon.offer(), reader, writer)
            assert await daemon_reader.readexactly(1) == shm_pipe.ACCEPT
            assert writer.transport.get_extra_info("shm_pipe") is True
            yield reader, writer, daemon
            writer.close()
        finally:
            daemon.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_bytes_from_p2pd_arrive_in_order_across_ring_wraps(loop_kind, tmp_path):
    async def main():
        async with pipe_pair(tmp_path) as (reader, writer, daemon):
            expected = os.urandom(50_000)
            sent, acked, received = 0, 0, bytearray()

            async def read_all():
                while len(received) < len(expected):
                    received.extend(await reader.read_payload(min(100_000, len(expected) - len(received))))

            reading = asyncio.create_task(read_all())
            while sent < len(expected):
                start = daemon.down_written % RING
                n = min(1500, RING - start, RING - (sent - acked), len(expected) - sent)
                if n == 0:
                    kind, value = await daemon.record()
                    assert kind == b"A" and 0 < value <= sent - acked
                    acked += value
                    continue
                daemon.send(expected[sent : sent + n])
                sent += n
            await reading
            assert bytes(received) == expected
            daemon.writer.write(RECORD.pack(b"E", 0))
            assert await reader.read(1) == b"" and reader.at_eof()

    run_in_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_bytes_to_p2pd_respect_the_ring_and_drain_waits(loop_kind, tmp_path):
    async def main():
        async with pipe_pair(tmp_path) as (reader, writer, daemon):
            writer.transport.set_write_buffer_limits(high=8192)
            payload = os.urandom(40_000)
            writer.write(payload[:30_000])
            writer.write(payload[30_000:])
            drain = asyncio.create_task(writer.drain())
            await asyncio.sleep(0.05)
            assert not drain.done(), "drain() must wait while more than the high-water mark is pending"
            assert writer.transport.get_write_buffer_size() == len(payload) - RING

            received, announced = bytearray(), 0
            while len(received) < len(payload):
                kind, value = await daemon.record()
                assert kind == b"D"
                announced += value
                assert announced - len(received) <= RING, "the client announced more than the ring holds"
                received += await daemon.receive(value)
            assert bytes(received) == payload
            await asyncio.wait_for(drain, 5)
            writer.write_eof()
            assert await daemon.record() == (b"E", 0)

    run_in_loop(loop_kind, main)


@pytest.mark.parametrize(
    "bad_record",
    [RECORD.pack(b"A", 1), RECORD.pack(b"D", RING + 1), RECORD.pack(b"D", 0), RECORD.pack(b"X", 5)],
    ids=["ack-of-nothing", "data-beyond-ring", "empty-data", "unknown-type"],
)
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_record_that_breaks_the_protocol_aborts_the_stream(loop_kind, tmp_path, bad_record):
    async def main():
        async with pipe_pair(tmp_path) as (reader, writer, daemon):
            daemon.writer.write(bad_record)
            with pytest.raises(shm_pipe.ShmPipeError):
                await reader.read(1)
            assert writer.transport.is_closing()

    run_in_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_an_offer_that_cannot_be_mapped_is_declined_and_the_socket_stays_plain(loop_kind, tmp_path):
    async def main():
        async with connected_pair(str(tmp_path / "s.sock")) as ((reader, writer), (daemon_reader, _)):
            for path in ["/dev/shm/hivemind-p2pd-0-missing", "/etc/passwd", "/dev/shm/../etc/hivemind-p2pd-1"]:
                offer = p2pd_pb2.StreamInfo(peer=b"x", addr=b"y", proto="t", shm_path=path, shm_ring_size=RING)
                same_reader, same_writer = shm_pipe.accept_shm_pipe(offer, reader, writer)
                assert (same_reader, same_writer) == (reader, writer)
                assert await daemon_reader.readexactly(1) == shm_pipe.DECLINE
            plain_info = p2pd_pb2.StreamInfo(peer=b"x", addr=b"y", proto="t")
            assert shm_pipe.accept_shm_pipe(plain_info, reader, writer) == (reader, writer)
            writer.write(b"plain bytes")
            assert await daemon_reader.readexactly(11) == b"plain bytes"

    run_in_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_p2pd_closing_while_reading_is_paused_is_reported(loop_kind, tmp_path):
    async def main():
        async with pipe_pair(tmp_path, ring_size=1 << 20) as (reader, writer, daemon):
            sent = os.urandom(4 * 65536)
            for offset in range(0, len(sent), 65536):  # more than the reader buffers: it pauses the pipe
                daemon.send(sent[offset : offset + 65536])
            await asyncio.sleep(0.1)
            assert writer.transport._reading_paused
            daemon.writer.close()  # p2pd aborts the stream
            await asyncio.sleep(0.1)
            writer.write(b"x" * 100_000)
            with pytest.raises(ConnectionError):
                await writer.drain()
            assert await reader.read() == sent, "bytes announced before the socket closed are still delivered"
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 5)

    run_in_loop(loop_kind, main)


def test_map_pipe_file_checks_size_and_range(tmp_path):
    with pytest.raises(ValueError):
        shm_pipe.map_pipe_file(f"/dev/shm/{shm_pipe.PIPE_NAME_PREFIX}x", 100)  # ring too small
    path = f"/dev/shm/{shm_pipe.PIPE_NAME_PREFIX}{os.getpid()}-size{os.urandom(4).hex()}"
    with open(path, "wb") as f:
        f.truncate(3 * RING)
    try:
        with pytest.raises(ValueError, match="owner or size"):
            shm_pipe.map_pipe_file(path, RING)
    finally:
        os.unlink(path)


def test_a_pipe_file_with_unreserved_pages_is_refused():
    path = f"/dev/shm/{shm_pipe.PIPE_NAME_PREFIX}{os.getpid()}-sparse{os.urandom(4).hex()}"
    with open(path, "wb") as f:
        f.truncate(2 * RING)  # right size, no page allocated: touching one on a full tmpfs would raise SIGBUS
    try:
        with pytest.raises(ValueError, match="not fully reserved"):
            shm_pipe.map_pipe_file(path, RING)
        os.truncate(path, 0)
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, 2 * RING)
        shm_pipe.map_pipe_file(path, RING).close()
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------- real daemons


def pipe_files(p2p: P2P):
    return glob.glob(f"/dev/shm/{shm_pipe.PIPE_NAME_PREFIX}{p2p._daemon.pid}-*")


async def echo_with_digest(stream_info, reader, writer):
    """Echo everything back, then an 32-byte SHA-256 of what was received."""
    digest = hashlib.sha256()
    while True:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write(digest.digest())
    await writer.drain()


async def call_echo(caller: P2P, callee: P2P, payload: bytes):
    _, reader, writer = await caller.call_binary_stream_handler(callee.peer_id, "echo")
    try:
        uses_pipe = writer.transport.get_extra_info("shm_pipe") is True

        async def send():
            for offset in range(0, len(payload), 300_001):  # odd chunk sizes: writes straddle ring wraps
                writer.write(payload[offset : offset + 300_001])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        echoed = await reader.readexactly(len(payload))
        digest = await reader.readexactly(32)
        assert await reader.read(1) == b""
        await sending
        return uses_pipe, echoed, digest
    finally:
        writer.close()


@pytest.fixture
async def p2p_pair():
    callee = await P2P.create()
    caller = await P2P.create(initial_peers=await callee.get_visible_maddrs())
    yield caller, callee
    await caller.shutdown()
    await callee.shutdown()


async def test_streams_between_daemons_go_through_reused_pipes(p2p_pair):
    caller, callee = p2p_pair
    handler_transports = []

    async def recording_echo(stream_info, reader, writer):
        handler_transports.append(writer.transport.get_extra_info("shm_pipe"))
        await echo_with_digest(stream_info, reader, writer)

    await callee.add_binary_stream_handler("echo", recording_echo)
    for size in [1, 5_000, 3 * 1024**2 + 7]:
        payload = os.urandom(size)
        uses_pipe, echoed, digest = await call_echo(caller, callee, payload)
        assert uses_pipe and echoed == payload and digest == hashlib.sha256(payload).digest()
    assert handler_transports == [True] * 3

    # eight at once, then many one after another: the daemons reuse a few pipe files instead of making new ones
    payloads = [os.urandom(1024**2 + i) for i in range(8)]
    results = await asyncio.gather(*(call_echo(caller, callee, payload) for payload in payloads))
    assert [echoed for _, echoed, _ in results] == payloads
    for _ in range(20):
        await call_echo(caller, callee, b"small")
    await asyncio.sleep(0.1)  # the daemons put the pipes of finished streams back
    assert 1 <= len(pipe_files(caller)) <= 4 and 1 <= len(pipe_files(callee)) <= 4


async def test_pipes_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(shm_pipe.SHM_ENV_VAR, "0")
    callee = await P2P.create()
    caller = await P2P.create(initial_peers=await callee.get_visible_maddrs())
    try:
        await callee.add_binary_stream_handler("echo", echo_with_digest)
        payload = os.urandom(2 * 1024**2)
        uses_pipe, echoed, digest = await call_echo(caller, callee, payload)
        assert not uses_pipe and echoed == payload and digest == hashlib.sha256(payload).digest()
        assert pipe_files(caller) == [] and pipe_files(callee) == []
    finally:
        await caller.shutdown()
        await callee.shutdown()


async def test_no_pipe_file_outlives_its_daemon():
    callee = await P2P.create()
    caller = await P2P.create(initial_peers=await callee.get_visible_maddrs())
    await callee.add_binary_stream_handler("echo", echo_with_digest)
    await call_echo(caller, callee, os.urandom(100_000))
    await asyncio.sleep(0.1)
    killed_pid, stopped_pid = caller._daemon.pid, callee._daemon.pid
    assert pipe_files(caller) and pipe_files(callee)

    os.kill(killed_pid, signal.SIGKILL)  # cannot clean up: its owner removes the files
    await caller.shutdown()
    await callee.shutdown()  # exits normally and removes its own files
    for pid in (killed_pid, stopped_pid):
        assert glob.glob(f"/dev/shm/{shm_pipe.PIPE_NAME_PREFIX}{pid}-*") == []


async def test_a_caller_leaving_without_reading_resets_the_handlers_stream(p2p_pair):
    caller, callee = p2p_pair
    outcome = asyncio.get_running_loop().create_future()

    async def flood(stream_info, reader, writer):
        chunk = bytes(1 << 20)
        try:
            for _ in range(300):  # far more than the rings, kernel buffers and yamux windows hold
                writer.write(chunk)
                await writer.drain()
            outcome.set_result("wrote everything")
        except ConnectionError as e:
            outcome.set_result(e)

    await callee.add_binary_stream_handler("flood", flood)
    _, reader, writer = await caller.call_binary_stream_handler(callee.peer_id, "flood")
    assert writer.transport.get_extra_info("shm_pipe") is True
    await reader.readexactly(1000)
    await asyncio.sleep(0.5)  # the caller's ring fills while nobody reads it
    writer.close()
    assert isinstance(await asyncio.wait_for(outcome, 20), ConnectionError)


async def test_a_handler_registered_again_without_pipes_gets_plain_streams(p2p_pair, monkeypatch):
    caller, callee = p2p_pair
    seen = []

    async def recording_echo(stream_info, reader, writer):
        seen.append(writer.transport.get_extra_info("shm_pipe"))
        await echo_with_digest(stream_info, reader, writer)

    await callee.add_binary_stream_handler("echo", recording_echo)
    await call_echo(caller, callee, b"with a pipe")
    await callee.remove_binary_stream_handler("echo")
    monkeypatch.setenv(shm_pipe.SHM_ENV_VAR, "0")  # the callee's client no longer asks for pipes
    await callee.add_binary_stream_handler("echo", recording_echo)
    payload = os.urandom(100_000)
    _, echoed, digest = await call_echo(caller, callee, payload)
    assert echoed == payload and digest == hashlib.sha256(payload).digest()
    assert seen == [True, None]
