"""Stream handlers of a client that went away without removing them (killed, or a replica shut down) are forgotten.

Before, p2pd kept them for its whole life: a long-lived daemon shared by processes that come and go (a DHT's daemon
used by averager or server processes) accumulated dead registrations, reset every incoming stream it sent to one of
them, and refused the same name to every later process ("handler ... already set").
"""

import asyncio
import os
import signal
import sys
import textwrap

import pytest

from hivemind.p2p import P2P, P2PDaemonError
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(90)

# attaches to a daemon, serves a binary stream handler that answers with its pid, prints "ready", then waits
CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from hivemind.p2p import P2P

    async def main(maddr, name, balanced):
        p2p = await P2P.replicate(maddr)

        async def whoami(info, reader, writer):
            writer.write(str(os.getpid()).encode())
            await writer.drain()
            writer.close()

        await p2p.add_binary_stream_handler(name, whoami, balanced=balanced)
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "balanced"))
    """
)


async def start_child(owner: P2P, name: str, balanced: bool) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(owner.daemon_listen_maddr),
        name,
        "balanced" if balanced else "exclusive",
        stdout=asyncio.subprocess.PIPE,
    )
    assert (await asyncio.wait_for(process.stdout.readline(), 30)).strip() == b"ready"
    return process


async def kill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    await process.wait()


async def whoami(caller: P2P, owner: P2P, name: str) -> int:
    _, reader, writer = await caller.call_binary_stream_handler(owner.peer_id, name)
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer, f"the stream to {name} ended without an answer (p2pd sent it to a client that is gone)"
    return int(answer)


def serve_pid(pid: int):
    async def handler(info, reader, writer):
        writer.write(str(pid).encode())
        await writer.drain()
        writer.close()

    return handler


async def test_name_of_a_killed_process_can_be_registered_again(p2p_pair):
    owner, caller = p2p_pair
    for _ in range(3):  # processes that hold the name one after another, each killed
        child = await start_child(owner, "exclusive_name", balanced=False)
        assert await whoami(caller, owner, "exclusive_name") == child.pid
        await kill(child)
    await owner.add_binary_stream_handler("exclusive_name", serve_pid(os.getpid()))
    assert await whoami(caller, owner, "exclusive_name") == os.getpid()


async def test_name_of_a_replica_shut_down_can_be_registered_again(p2p_pair):
    owner, caller = p2p_pair
    for number in range(3):
        replica = await P2P.replicate(owner.daemon_listen_maddr)
        await replica.add_binary_stream_handler("replica_name", serve_pid(number))
        assert await whoami(caller, owner, "replica_name") == number
        await replica.shutdown()  # without removing the handler first
    await owner.add_binary_stream_handler("replica_name", serve_pid(os.getpid()))
    assert await whoami(caller, owner, "replica_name") == os.getpid()


async def test_a_name_held_by_a_live_process_is_still_refused(p2p_pair):
    owner, caller = p2p_pair
    child = await start_child(owner, "held_name", balanced=False)
    try:
        with pytest.raises(P2PDaemonError, match="already set"):
            await owner.add_binary_stream_handler("held_name", serve_pid(os.getpid()))
        assert await whoami(caller, owner, "held_name") == child.pid  # and the probe did not disturb the holder
    finally:
        await kill(child)


async def test_balanced_streams_skip_killed_processes(p2p_pair):
    owner, caller = p2p_pair
    await owner.add_binary_stream_handler("shared_name", serve_pid(os.getpid()), balanced=True)
    for _ in range(3):  # worker processes that joined the name and were killed
        await kill(await start_child(owner, "shared_name", balanced=True))
    survivor = await start_child(owner, "shared_name", balanced=True)
    try:
        pids = [await whoami(caller, owner, "shared_name") for _ in range(8)]
        assert set(pids) == {os.getpid(), survivor.pid}
        assert pids.count(survivor.pid) == 4  # round-robin between the two live ones only
    finally:
        await kill(survivor)


async def test_replica_shutdown_unregisters_its_stream_handlers(p2p_pair):
    owner, caller = p2p_pair
    for number in range(3):  # names of their own, which no later process registers or calls until now
        replica = await P2P.replicate(owner.daemon_listen_maddr)
        await replica.add_binary_stream_handler(f"replica_own_name_{number}", serve_pid(number))
        await replica.shutdown()
    for number in range(3):  # the daemon forgot them at once: a caller is told the name is not served
        with pytest.raises(P2PDaemonError, match="protocols not supported"):
            await caller.call_binary_stream_handler(owner.peer_id, f"replica_own_name_{number}")


async def test_name_of_a_killed_stream_handler_can_be_registered_as_unary(p2p_pair):
    """Before, only a stream registration probed the holder: a unary one was refused ("already set") until the
    daemon's sweep found the killed process's socket file removed (a killed process leaves its file)."""
    owner, caller = p2p_pair
    child = await start_child(owner, "stream_then_unary", balanced=False)
    await kill(child)

    async def echo(request: test_pb2.TestRequest, context) -> test_pb2.TestResponse:
        return test_pb2.TestResponse(number=request.number + 1)

    await owner.add_protobuf_handler("stream_then_unary", echo, test_pb2.TestRequest)
    response = await caller.call_protobuf_handler(
        owner.peer_id, "stream_then_unary", test_pb2.TestRequest(number=41), test_pb2.TestResponse
    )
    assert response.number == 42


async def test_name_of_a_live_stream_handler_is_refused_as_unary(p2p_pair):
    owner, caller = p2p_pair
    child = await start_child(owner, "live_stream_name", balanced=False)
    try:

        async def echo(request: test_pb2.TestRequest, context) -> test_pb2.TestResponse:
            return test_pb2.TestResponse(number=request.number)

        with pytest.raises(P2PDaemonError, match="already set.*stream handler of another client"):
            await owner.add_protobuf_handler("live_stream_name", echo, test_pb2.TestRequest)
        assert await whoami(caller, owner, "live_stream_name") == child.pid
    finally:
        await kill(child)
