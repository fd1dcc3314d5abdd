"""A peer created with use_relay=False still reaches peers that are reachable only through a relay, as with hivemind
1.1.12 (its daemon keeps the relay transport; use_relay=False only stops serving as a relay). Before, its calls to
such a peer waited, without an error, for a direct connection that could never come (until unary_call_timeout, and
forever for a stream call)."""

import asyncio

import pytest
from test_p2p_relay import UNREACHABLE, first_answer, square, wait_for_relay_addrs

from hivemind.p2p import P2PContext
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)


async def squares(request: test_pb2.TestRequest, context: P2PContext):
    for number in range(request.number):
        yield test_pb2.TestResponse(number=number**2)


async def test_a_peer_without_use_relay_reaches_a_peer_behind_a_relay(p2p_factory):
    relay = await p2p_factory(force_reachability="public")
    relay_maddrs = await relay.get_visible_maddrs()
    unreachable = await p2p_factory(initial_peers=relay_maddrs, **UNREACHABLE)
    assert await wait_for_relay_addrs(unreachable, relay), "the unreachable peer announced no relay address"
    await unreachable.add_protobuf_handler("square", square, test_pb2.TestRequest)
    await unreachable.add_protobuf_handler("squares", squares, test_pb2.TestRequest, stream_output=True)

    caller = await p2p_factory(initial_peers=relay_maddrs, use_relay=False)
    response = await first_answer(
        lambda: caller.call_protobuf_handler(
            unreachable.peer_id, "square", test_pb2.TestRequest(number=3), test_pb2.TestResponse, timeout=5
        )
    )
    assert response.number == 9

    async def stream_call():
        stream = await caller.iterate_protobuf_handler(
            unreachable.peer_id, "squares", test_pb2.TestRequest(number=3), test_pb2.TestResponse
        )
        return [response.number async for response in stream]

    assert await asyncio.wait_for(stream_call(), 10) == [0, 1, 4]
