"""A stream handler that returns before reading all of its caller's input: its replies still all arrive.

Closing a stream that has unread input in it resets the stream, and the reset can overtake replies that were
written just before (the averaging reducer answers its last part and returns while the sender is still sending).
"""

import asyncio
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2PContext
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(120)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse
REPLIES = 20


async def reply_then_return_early(requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
    async for _request in requests:
        for i in range(REPLIES):
            yield Response(number=i)
        return  # the caller is still sending: its remaining requests stay unread


async def endless_requests() -> AsyncIterator[Request]:
    for i in range(10**6):
        yield Request(number=i)
        if i % 64 == 0:
            await asyncio.sleep(0)


async def test_replies_of_a_handler_that_returns_early_are_never_lost(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler(
        "reply_then_return_early", reply_then_return_early, Request, stream_input=True, stream_output=True
    )
    for _ in range(30):
        stream = await second.iterate_protobuf_handler(
            first.peer_id, "reply_then_return_early", endless_requests(), Response
        )
        received = [response.number async for response in stream]
        assert received == list(range(REPLIES))
