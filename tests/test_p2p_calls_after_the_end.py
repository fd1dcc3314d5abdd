"""Every P2P method that talks to p2pd says why it cannot once the P2P was shut down or its daemon died, instead of
a bare 'Cannot connect to p2pd at /unix/...: No such file or directory / Connection refused'."""

import os
import signal

import pytest

from hivemind.p2p import P2P, P2PContext, P2PDaemonError
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)


async def square(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    return test_pb2.TestResponse(number=request.number**2)


async def raw_handler(stream_info, reader, writer):
    writer.close()


def daemon_calls(p2p: P2P):
    return {
        "get_visible_maddrs(latest=True)": lambda: p2p.get_visible_maddrs(latest=True),
        "list_peers": p2p.list_peers,
        "wait_for_at_least_n_peers": lambda: p2p.wait_for_at_least_n_peers(1, attempts=1),
        "add_protobuf_handler": lambda: p2p.add_protobuf_handler("square", square, test_pb2.TestRequest),
        "add_protobuf_handler (stream)": lambda: p2p.add_protobuf_handler(
            "squares", square, test_pb2.TestRequest, stream_output=True
        ),
        "remove_protobuf_handler": lambda: p2p.remove_protobuf_handler("square"),
        "add_binary_stream_handler": lambda: p2p.add_binary_stream_handler("raw", raw_handler),
        "remove_binary_stream_handler": lambda: p2p.remove_binary_stream_handler("raw"),
    }


async def assert_each_call_says(p2p: P2P, reason: str):
    wrong = {}
    for name, call in daemon_calls(p2p).items():
        try:
            await call()
            wrong[name] = "no error"
        except P2PDaemonError as e:
            if reason not in str(e):  # before: 'Cannot connect to p2pd at ...' for all but the unary handler calls
                wrong[name] = str(e)
    assert not wrong


async def test_calls_after_shutdown_say_it_was_shut_down():
    p2p = await P2P.create()
    await p2p.shutdown()
    await assert_each_call_says(p2p, "was shut down")


async def test_calls_after_the_daemon_died_say_how_it_ended():
    p2p = await P2P.create()
    try:
        os.kill(p2p._daemon.pid, signal.SIGKILL)
        await p2p._daemon.wait_exited(timeout=10)
        await assert_each_call_says(p2p, "p2pd exited with code -9")
    finally:
        await p2p.shutdown()
