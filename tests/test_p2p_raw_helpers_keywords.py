"""P2P's framing helpers take the keywords that code written for hivemind 1.1.12 passes them:
``send_raw_data(data, writer, chunk_size=...)`` and ``send_protobuf(protobuf=..., writer=...)``."""

import asyncio

import pytest

from hivemind.p2p import P2P
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(30)


async def test_raw_helpers_take_the_keywords_of_hivemind_1_1_12(p2p_pair):
    first, second = p2p_pair

    async def reverse(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        data = await P2P.receive_raw_data(reader)
        await P2P.send_raw_data(data[::-1], writer, chunk_size=4)  # before: TypeError (unexpected keyword)
        request, _ = await P2P.receive_protobuf(test_pb2.TestRequest, reader)
        await P2P.send_protobuf(protobuf=test_pb2.TestResponse(number=request.number + 1), writer=writer)
        writer.close()

    await first.add_binary_stream_handler("reverse", reverse)
    _, reader, writer = await second.call_binary_stream_handler(first.peer_id, "reverse")
    try:
        await P2P.send_raw_data(b"hello, world", writer, chunk_size=1)
        assert await P2P.receive_raw_data(reader) == b"dlrow ,olleh"
        await P2P.send_protobuf(protobuf=test_pb2.TestRequest(number=41), writer=writer)
        response, error = await P2P.receive_protobuf(test_pb2.TestResponse, reader)
        assert error is None and response.number == 42
    finally:
        writer.close()
