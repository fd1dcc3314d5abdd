"""Handler tasks of a p2pd client stay owned: none runs after close, and each unary handler stays cancellable."""

import asyncio
from types import SimpleNamespace

import pytest
from multiaddr import Multiaddr
from unix_socket_pair import connected_pair

from hivemind.p2p.p2p_daemon_bindings.control import ControlClient
from hivemind.p2p.p2p_daemon_bindings.persistent import PersistentConnection
from hivemind.p2p.p2p_daemon_bindings.utils import serialize_delimited
from hivemind.proto import p2pd_pb2

pytestmark = pytest.mark.timeout(20)

CALL_ID = bytes(range(16))


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


async def test_unary_handler_for_a_reused_call_id_stays_cancellable(tmp_path):
    # a remote caller picks the call id: it can leave a call (p2pd sends cancel) and at once call again with the same
    # id; the first handler's end must not make the connection forget the second one
    started, cancelled = asyncio.Queue(), asyncio.Queue()

    async def slow(data: bytes, peer) -> bytes:
        started.put_nowait(data)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.put_nowait(data)
            raise

    def request(data: bytes) -> bytes:
        handling = p2pd_pb2.CallUnaryRequest(peer=b"x", proto="slow", data=data)
        return serialize_delimited(p2pd_pb2.PersistentConnectionResponse(callId=CALL_ID, requestHandling=handling))

    cancel = serialize_delimited(p2pd_pb2.PersistentConnectionResponse(callId=CALL_ID, cancel=p2pd_pb2.Cancel()))
    async with connected_pair(str(tmp_path / "persistent.sock")) as ((reader, writer), (_, daemon_writer)):
        connection = PersistentConnection(reader, writer, max_msg_size=2**20)
        connection._handlers["slow"] = slow
        connection.start()
        try:
            daemon_writer.write(request(b"first"))
            assert await asyncio.wait_for(started.get(), 5) == b"first"
            daemon_writer.write(cancel + request(b"second"))  # dispatched before the first handler has ended
            assert await asyncio.wait_for(cancelled.get(), 5) == b"first"
            assert await asyncio.wait_for(started.get(), 5) == b"second"
            await asyncio.sleep(0)  # the first handler's task finishes
            daemon_writer.write(cancel)
            assert await asyncio.wait_for(cancelled.get(), 5) == b"second"
        finally:
            await connection.close()
