"""A handler name that cannot work, or a peer id that is not a PeerID, is refused where it is passed.

libp2p negotiates a protocol id of at most 1023 bytes: a longer handler name was registered, and every call to it
then failed with "stream reset". A non-str name failed inside protobuf, a base58 string as peer id with an
AttributeError.
"""

import pytest

from hivemind.p2p import PeerID
from hivemind.proto import test_pb2

TOO_LONG_NAMES = ["x" * 1024, "ü" * 512]  # 1024 bytes in UTF-8 each


async def _handler(request, context):
    return test_pb2.TestResponse(number=request.number + 1)


async def _stream_handler(stream_info, reader, writer):
    writer.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", TOO_LONG_NAMES, ids=["ascii", "utf8"])
async def test_a_handler_name_longer_than_libp2p_allows_is_refused(p2p_pair, name):
    server, client = p2p_pair
    for stream_output in (False, True):
        with pytest.raises(ValueError, match="1024 bytes.*at most 1023.*shorter"):
            await server.add_protobuf_handler(name, _handler, test_pb2.TestRequest, stream_output=stream_output)
    with pytest.raises(ValueError, match="at most 1023"):
        await server.add_binary_stream_handler(name, _stream_handler)
    with pytest.raises(ValueError, match="at most 1023"):
        await client.call_protobuf_handler(server.peer_id, name, test_pb2.TestRequest(number=1), test_pb2.TestResponse)
    with pytest.raises(ValueError, match="at most 1023"):
        await client.call_binary_stream_handler(server.peer_id, name)


@pytest.mark.timeout(30)
async def test_the_longest_workable_name_works(p2p_pair):
    server, client = p2p_pair
    name = "x" * 1023
    await server.add_protobuf_handler(name, _handler, test_pb2.TestRequest)
    request = test_pb2.TestRequest(number=1)
    response = await client.call_protobuf_handler(server.peer_id, name, request, test_pb2.TestResponse)
    assert response.number == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", [5, b"abc", None])
async def test_a_handler_name_that_is_not_a_str_is_refused(p2p_pair, name):
    server, client = p2p_pair
    with pytest.raises(TypeError, match="handler name must be a str"):
        await server.add_protobuf_handler(name, _handler, test_pb2.TestRequest)
    with pytest.raises(TypeError, match="handler name must be a str"):
        await client.call_protobuf_handler(server.peer_id, name, test_pb2.TestRequest(number=1), test_pb2.TestResponse)


@pytest.mark.timeout(30)
async def test_a_peer_id_given_as_a_string_is_refused_with_the_conversion_to_use(p2p_pair):
    server, client = p2p_pair
    await server.add_protobuf_handler("echo", _handler, test_pb2.TestRequest)
    as_text = server.peer_id.to_base58()
    request = test_pb2.TestRequest(number=1)
    with pytest.raises(TypeError, match=r"peer_id must be a PeerID.*PeerID\.from_base58"):
        await client.call_protobuf_handler(as_text, "echo", request, test_pb2.TestResponse)
    with pytest.raises(TypeError, match="PeerID.from_base58"):
        await client.iterate_protobuf_handler(as_text, "echo", request, test_pb2.TestResponse)
    with pytest.raises(TypeError, match="PeerID.from_base58"):
        await client.call_binary_stream_handler(as_text, "echo")
    response = await client.call_protobuf_handler(PeerID.from_base58(as_text), "echo", request, test_pb2.TestResponse)
    assert response.number == 2


@pytest.mark.timeout(30)
async def test_a_handler_that_is_not_callable_or_a_message_instance_as_type_is_refused(p2p_pair):
    # both were registered, and then every call failed at the server ("'TestRequest' object is not callable")
    server, client = p2p_pair
    with pytest.raises(TypeError, match="handler must be callable"):
        await server.add_protobuf_handler("none", None, test_pb2.TestRequest)
    with pytest.raises(TypeError, match="handler must be callable"):
        await server.add_binary_stream_handler("none", None)
    with pytest.raises(TypeError, match=r"input_protobuf_type must be a protobuf message class.*TestRequest, not"):
        await server.add_protobuf_handler("instance", _handler, test_pb2.TestRequest())


@pytest.mark.timeout(30)
async def test_a_call_with_a_dict_input_or_an_output_instance_is_refused(p2p_pair):
    server, client = p2p_pair
    await server.add_protobuf_handler("echo", _handler, test_pb2.TestRequest)
    with pytest.raises(TypeError, match="input must be a protobuf message or an async iterator of messages, got dict"):
        await client.call_protobuf_handler(server.peer_id, "echo", {"number": 1}, test_pb2.TestResponse)
    with pytest.raises(TypeError, match=r"output_protobuf_type must be a protobuf message class.*TestResponse, not"):
        request = test_pb2.TestRequest(number=1)
        await client.call_protobuf_handler(server.peer_id, "echo", request, test_pb2.TestResponse())
    with pytest.raises(TypeError, match="output_protobuf_type must be a protobuf message class"):
        await client.iterate_protobuf_handler(server.peer_id, "echo", test_pb2.TestRequest(number=1), None)
