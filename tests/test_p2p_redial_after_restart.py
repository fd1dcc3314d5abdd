"""A peer that was down for a while and restarts on the same identity and address is reachable again soon.

libp2p refuses to dial an address that failed recently ("dial backoff"); with its default schedule (5 s after the
first failure, 6 s after the second, ... up to 5 minutes) a client that kept calling a dead server could not reach
it for seconds to minutes after it came back. p2pd bounds that: a call of the client dials again once
-dialBackoffBase (1 s) has passed since its last failed dial.
"""

import asyncio
import socket
import time

import pytest

from hivemind.p2p import P2P, P2PContext, P2PDaemonError
from hivemind.proto import test_pb2

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse

# The server stays down this long while the client retries every RETRY_INTERVAL, as an MoE client or an averager
# that keeps trying a peer would. With libp2p's default backoff the client dials at 0 s and 5 s, and is then refused
# until 11 s: about 4 s after the server is back. With p2pd's bound it dials about once a second.
DOWN_TIME = 6.5
RETRY_INTERVAL = 0.5
REACHED_WITHIN = 2.5  # seconds after the restarted server is ready


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_server(p2p_factory, identity_path: str, port: int) -> P2P:
    server = await p2p_factory(identity_path=identity_path, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"])

    async def increment(request: Request, context: P2PContext) -> Response:
        return Response(number=request.number + 1)

    await server.add_protobuf_handler("increment", increment, Request)
    return server


async def call(client: P2P, server_id) -> Response:
    request = Request(number=1)
    return await asyncio.wait_for(client.call_protobuf_handler(server_id, "increment", request, Response), 10)


@pytest.mark.timeout(40)
async def test_client_reaches_restarted_server_within_seconds(p2p_factory, tmp_path):
    identity_path, port = str(tmp_path / "server.key"), free_tcp_port()
    server = await start_server(p2p_factory, identity_path, port)
    server_id = server.peer_id
    client = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    assert (await call(client, server_id)).number == 2

    await server.shutdown()
    down_until = time.monotonic() + DOWN_TIME
    while time.monotonic() < down_until:
        with pytest.raises(P2PDaemonError):
            await call(client, server_id)
        await asyncio.sleep(RETRY_INTERVAL)

    server = await start_server(p2p_factory, identity_path, port)
    assert server.peer_id == server_id
    back_at = time.monotonic()
    while True:
        try:
            response = await call(client, server_id)
            break
        except P2PDaemonError as e:
            waited = time.monotonic() - back_at
            assert waited < REACHED_WITHIN, f"the restarted server is still unreachable after {waited:.1f} s: {e}"
            await asyncio.sleep(0.1)
    assert response.number == 2
