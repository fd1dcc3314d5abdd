"""A dying daemon or peer makes pending and later calls fail promptly with P2PDaemonError instead of hanging."""

import asyncio
import os
import signal
import time
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2PContext, P2PDaemonError, P2PHandlerError
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse


async def start_stuck_unary_call(caller, callee):
    started = asyncio.Event()

    async def stuck(request: Request, context: P2PContext) -> Response:
        started.set()
        await asyncio.sleep(3600)

    await callee.add_protobuf_handler("stuck", stuck, Request)
    call = asyncio.create_task(caller.call_protobuf_handler(callee.peer_id, "stuck", Request(), Response))
    await asyncio.wait_for(started.wait(), 10)
    return call


async def test_local_daemon_killed_mid_unary_call(p2p_pair):
    first, second = p2p_pair
    call = await start_stuck_unary_call(second, first)
    os.kill(second._daemon.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(P2PDaemonError, match="exited with code -9"):
        await asyncio.wait_for(call, 10)
    assert time.monotonic() - started < 3
    assert not second.is_alive


async def test_remote_daemon_killed_mid_unary_call(p2p_pair):
    first, second = p2p_pair
    call = await start_stuck_unary_call(second, first)
    os.kill(first._daemon.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(P2PDaemonError):
        await asyncio.wait_for(call, 10)
    assert time.monotonic() - started < 5
    assert second.is_alive


async def test_calls_after_daemon_death_fail_immediately(p2p_pair):
    first, second = p2p_pair
    pid = second._daemon.pid
    os.kill(pid, signal.SIGKILL)
    while second.is_alive:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(P2PDaemonError, match="p2pd"):
        await second.call_protobuf_handler(first.peer_id, "anything", Request(), Response)
    with pytest.raises(P2PDaemonError):
        async for _ in await second.iterate_protobuf_handler(first.peer_id, "anything", Request(), Response):
            pass
    assert time.monotonic() - started < 1


async def test_local_daemon_killed_mid_stream(p2p_pair):
    first, second = p2p_pair

    async def endless(request: Request, context: P2PContext) -> AsyncIterator[Response]:
        while True:
            yield Response(number=1)
            await asyncio.sleep(0.01)

    await first.add_protobuf_handler("endless", endless, Request, stream_output=True)
    received = 0
    started = None
    with pytest.raises(P2PDaemonError, match="p2pd"):
        async for _ in await second.iterate_protobuf_handler(first.peer_id, "endless", Request(), Response):
            received += 1
            if received == 3:
                os.kill(second._daemon.pid, signal.SIGKILL)
                started = time.monotonic()
    assert time.monotonic() - started < 3


async def test_shutdown_fails_pending_calls(p2p_pair):
    first, second = p2p_pair
    call = await start_stuck_unary_call(second, first)
    await second.shutdown()
    with pytest.raises(P2PDaemonError):
        await asyncio.wait_for(call, 5)


async def test_shutdown_fails_pending_stream_calls(p2p_pair):
    first, second = p2p_pair

    async def silent(request: Request, context: P2PContext) -> AsyncIterator[Response]:
        await asyncio.sleep(3600)
        yield Response()

    await first.add_protobuf_handler("silent", silent, Request, stream_output=True)

    async def consume():
        async for _ in await second.iterate_protobuf_handler(first.peer_id, "silent", Request(), Response):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    await second.shutdown()
    with pytest.raises(P2PDaemonError):
        await asyncio.wait_for(task, 5)


async def test_unreachable_peer_fails_instead_of_hanging(p2p_factory):
    lonely = await p2p_factory()
    ghost = await p2p_factory()
    ghost_id = ghost.peer_id
    await ghost.shutdown()
    with pytest.raises((P2PDaemonError, P2PHandlerError)):
        await asyncio.wait_for(lonely.call_protobuf_handler(ghost_id, "anything", Request(), Response), 30)
