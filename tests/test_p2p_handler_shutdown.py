"""A closed p2pd client serves no more streams: one accepted while it was closing is dropped, not handled."""

import asyncio
from types import SimpleNamespace

import pytest
from multiaddr import Multiaddr
from unix_socket_pair import connected_pair

from hivemind.p2p.p2p_daemon_bindings.control import ControlClient
from hivemind.p2p.p2p_daemon_bindings.utils import serialize_delimited
from hivemind.proto import p2pd_pb2

pytestmark = pytest.mark.timeout(20)


async def test_stream_that_arrives_after_close_is_not_handled(tmp_path):
    # close() cancels and awaits the handler tasks it knows; a connection the callback server accepted just before
    # closing starts its task afterwards, and that task must not run a handler that nobody will cancel or await
    connector = SimpleNamespace(max_msg_size=2**20)  # all that serving a stream uses of it
    client = ControlClient(connector, listen_maddr=Multiaddr(f"/unix{tmp_path}/callback.sock"))
    handled = []

    async def handler(stream_info, reader, writer):
        handled.append(stream_info.proto)

    client._stream_handlers["late"] = handler
    await client.close()
    async with connected_pair(str(tmp_path / "stream.sock")) as ((_, daemon_writer), (reader, writer)):
        info = p2pd_pb2.StreamInfo(peer=b"x", addr=Multiaddr("/ip4/127.0.0.1/tcp/1").to_bytes(), proto="late")
        daemon_writer.write(serialize_delimited(info))
        await daemon_writer.drain()
        await asyncio.wait_for(client._on_incoming_stream(reader, writer), 5)
        assert handled == []
        assert writer.is_closing()
