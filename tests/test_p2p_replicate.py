"""Several processes sharing one daemon: ``P2P.replicate`` and balanced handlers."""

import asyncio
import os
import sys
import textwrap
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2P, P2PContext, P2PDaemonError
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse

# a child process that attaches to a daemon, serves "whoami" (unary) and "whoami_stream" and answers with its pid
CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from hivemind.p2p import P2P
    from hivemind.proto import test_pb2

    async def whoami(request, context):
        return test_pb2.TestResponse(number=os.getpid())

    async def whoami_stream(request, context):
        yield test_pb2.TestResponse(number=os.getpid())

    async def main(maddr, balanced):
        p2p = await P2P.replicate(maddr)
        try:
            await p2p.add_protobuf_handler("whoami", whoami, test_pb2.TestRequest, balanced=balanced)
            await p2p.add_protobuf_handler(
                "whoami_stream", whoami_stream, test_pb2.TestRequest, stream_output=True, balanced=balanced
            )
            print("ready", p2p.peer_id, flush=True)
        except Exception as e:
            print("error", repr(e).replace(chr(10), " "), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        await p2p.shutdown()

    asyncio.run(main(sys.argv[1], sys.argv[2] == "balanced"))
    """
)


async def start_child(p2p: P2P, balanced: bool):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(p2p.daemon_listen_maddr),
        "balanced" if balanced else "exclusive",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
    return process, line


async def stop_child(process) -> None:
    process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), 10)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()


async def whoami(request: Request, context: P2PContext) -> Response:
    return Response(number=os.getpid())


async def whoami_stream(request: Request, context: P2PContext) -> AsyncIterator[Response]:
    yield Response(number=os.getpid())


async def test_replica_in_child_process_serves_handlers(p2p_pair):
    owner, caller = p2p_pair
    child, line = await start_child(owner, balanced=False)
    try:
        assert line == f"ready {owner.peer_id}"
        response = await caller.call_protobuf_handler(owner.peer_id, "whoami", Request(), Response)
        assert response.number == child.pid
        responses = await caller.iterate_protobuf_handler(owner.peer_id, "whoami_stream", Request(), Response)
        assert [r.number async for r in responses] == [child.pid]
    finally:
        await stop_child(child)
    assert owner.is_alive  # a replica leaving does not stop the owner's daemon
    with pytest.raises(P2PDaemonError):  # its unary handlers went away with its persistent connection
        await caller.call_protobuf_handler(owner.peer_id, "whoami", Request(), Response)


async def test_replicate_in_same_process_shares_peer_id(p2p_factory):
    owner = await p2p_factory()
    replica = await P2P.replicate(owner.daemon_listen_maddr)
    try:
        assert replica.peer_id == owner.peer_id and replica.is_alive
        assert replica.daemon_listen_maddr == owner.daemon_listen_maddr
    finally:
        await replica.shutdown()
    assert owner.is_alive


async def test_balanced_handlers_across_processes_share_calls(p2p_pair):
    owner, caller = p2p_pair
    await owner.add_protobuf_handler("whoami", whoami, Request, balanced=True)
    await owner.add_protobuf_handler("whoami_stream", whoami_stream, Request, stream_output=True, balanced=True)
    child, line = await start_child(owner, balanced=True)
    try:
        assert line.startswith("ready")
        unary_pids = [
            (await caller.call_protobuf_handler(owner.peer_id, "whoami", Request(), Response)).number for _ in range(6)
        ]
        stream_pids = []
        for _ in range(6):
            responses = await caller.iterate_protobuf_handler(owner.peer_id, "whoami_stream", Request(), Response)
            stream_pids.extend([r.number async for r in responses])
        assert set(unary_pids) == set(stream_pids) == {os.getpid(), child.pid}
        assert unary_pids.count(child.pid) == 3  # round-robin
    finally:
        await stop_child(child)


async def test_unbalanced_duplicate_from_another_process_is_refused(p2p_pair):
    owner, _ = p2p_pair
    await owner.add_protobuf_handler("whoami", whoami, Request)
    child, line = await start_child(owner, balanced=False)
    try:
        assert line.startswith("error") and "P2PDaemonError" in line and "already" in line
    finally:
        await stop_child(child)
