"""p2pd under unary requests that announce more than they send, or stop half-way: its memory stays small, the
stream is dropped, and honest calls keep working (real daemons on 127.0.0.1)."""

import asyncio
from typing import Tuple

import pytest

from hivemind.p2p import P2P, P2PContext, P2PDaemonError
from hivemind.p2p.daemon_args import build_daemon_args
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)

MiB, GiB = 1024**2, 1024**3


async def square(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    return test_pb2.TestResponse(number=request.number**2)


def daemon_rss(p2p: P2P) -> int:
    """Resident memory of the p2pd process behind ``p2p``, in bytes (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{p2p._daemon.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line in /proc/<pid>/status")


async def server_and_attacker(p2p_factory, **server_kwargs) -> Tuple[P2P, P2P]:
    server = await p2p_factory(**server_kwargs)
    await server.add_protobuf_handler("square", square, test_pb2.TestRequest)
    attacker = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    await attacker.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    await assert_honest_call_works(attacker, server)
    return server, attacker


async def assert_honest_call_works(caller: P2P, server: P2P) -> None:
    response = await caller.call_protobuf_handler(
        server.peer_id, "square", test_pb2.TestRequest(number=7), test_pb2.TestResponse
    )
    assert response.number == 49


async def send_raw_request(attacker: P2P, server: P2P, announced: int, body: bytes, *, finish: bool) -> bytes:
    """Open a raw stream to the unary handler, announce ``announced`` bytes, send ``body``; with ``finish``,
    close the sending side. Returns what the server sent back once it ended the stream (b"" if nothing)."""
    _, reader, writer = await attacker.call_binary_stream_handler(server.peer_id, "square")
    try:
        writer.write(encode_varint(announced) + body)
        await writer.drain()
        if finish:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout=20)
    finally:
        writer.close()


async def test_announced_gigabytes_below_the_limit_take_memory_only_for_what_arrived(p2p_factory):
    # the limit is above the announced size, so only growing the buffer as bytes arrive keeps memory small
    server, attacker = await server_and_attacker(p2p_factory, persistent_conn_max_msg_size=2 * GiB)
    before = daemon_rss(server)
    for _ in range(4):
        answer = await send_raw_request(attacker, server, GiB, b"\x0a" * MiB, finish=True)
        assert answer == b""  # the truncated request was dropped, not answered
    growth = daemon_rss(server) - before
    assert growth < 16 * MiB, f"p2pd grew by {growth / MiB:.1f} MiB for 4 requests announcing 1 GiB each"
    await assert_honest_call_works(attacker, server)


async def test_announced_size_above_the_limit_is_refused_before_reading(p2p_factory):
    server, attacker = await server_and_attacker(p2p_factory)  # the default limit: 4 MiB
    before = daemon_rss(server)
    for _ in range(4):
        # the stream is not finished by the attacker: the server must end it on its own
        assert await send_raw_request(attacker, server, GiB, b"\x0a" * 1000, finish=False) == b""
    growth = daemon_rss(server) - before
    assert growth < 16 * MiB, f"p2pd grew by {growth / MiB:.1f} MiB for 4 refused requests"
    await assert_honest_call_works(attacker, server)


async def test_stalled_unary_request_is_dropped_after_the_read_timeout(p2p_factory):
    server = await p2p_factory(daemon_flags={"unaryReadTimeout": "1s"})
    await server.add_protobuf_handler("square", square, test_pb2.TestRequest)
    attacker = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    await attacker.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)

    started = asyncio.get_running_loop().time()
    # half of a 1000-byte request, then silence with the stream left open
    assert await send_raw_request(attacker, server, 1000, b"\x0a" * 500, finish=False) == b""
    assert asyncio.get_running_loop().time() - started < 10
    await assert_honest_call_works(attacker, server)


async def test_streams_of_one_peer_above_the_limit_are_refused_others_still_served(p2p_factory):
    limit, opened = 4, 7
    server = await p2p_factory(daemon_flags={"limitStreamsPerPeer": limit}, dht_mode="client")
    await server.add_protobuf_handler("square", square, test_pb2.TestRequest)
    held, refused, all_settled = [], [], asyncio.Event()

    def settle() -> None:
        if len(held) + len(refused) == opened:
            all_settled.set()

    async def hold(stream_info, reader, writer):
        held.append(stream_info)
        settle()
        await reader.read()  # until the caller closes its stream
        writer.close()

    await server.add_binary_stream_handler("hold", hold)
    attacker = await p2p_factory(initial_peers=await server.get_visible_maddrs(), dht_mode="client")
    await attacker.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)

    async def open_and_wait(writers):
        _, reader, writer = await attacker.call_binary_stream_handler(server.peer_id, "hold")
        writers.append(writer)
        writer.write(b"x")
        if await reader.read() == b"":  # the server ended the stream: it was refused
            refused.append(writer)
            settle()

    writers = []
    waiters = [asyncio.ensure_future(open_and_wait(writers)) for _ in range(opened)]
    try:
        await asyncio.wait_for(all_settled.wait(), timeout=20)
        assert len(held) <= limit and len(refused) >= opened - limit

        honest = await p2p_factory(initial_peers=await server.get_visible_maddrs(), dht_mode="client")
        await honest.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
        await assert_honest_call_works(honest, server)
    finally:
        for writer in writers:
            writer.close()
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def test_daemon_flags_are_passed_to_p2pd_after_the_options():
    args = build_daemon_args(
        control_maddr="/unix/tmp/x.sock", daemon_flags={"limitConns": 100, "resourceLimits": False}
    )
    assert args[-2:] == ["-limitConns=100", "-resourceLimits=0"]


@pytest.mark.parametrize(
    "flags, problem",
    [
        ({"limit Conns": 1}, "not a p2pd flag name"),
        ({"-limitConns": 1}, "not a p2pd flag name"),
        ({"persistentConnMaxMsgSize": 1}, "already set by a P2P.create option"),
        ({"hostAddrs": "/ip4/0.0.0.0/tcp/0"}, "already set by a P2P.create option"),
        ({"limitConns": [1]}, "must be a number"),
        ({"limitConns": "1\n-id=/tmp/key"}, "one-line string"),
    ],
)
def test_daemon_flags_that_are_malformed_or_taken_are_refused(flags, problem):
    with pytest.raises(ValueError, match=problem):
        build_daemon_args(control_maddr="/unix/tmp/x.sock", daemon_flags=flags)


async def test_an_unknown_daemon_flag_fails_the_start_with_the_daemons_words(p2p_factory):
    with pytest.raises(P2PDaemonError, match="noSuchFlag"):
        await p2p_factory(daemon_flags={"noSuchFlag": 1})
