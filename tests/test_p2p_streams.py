"""DirectStreamReader / DirectReadProtocol over real unix sockets, with asyncio's and uvloop's event loops."""

import asyncio
import os

import pytest
from unix_socket_pair import LOOPS, connected_pair, run_in_loop

from hivemind.p2p.p2p_daemon_bindings import streams

pytestmark = pytest.mark.timeout(30)


def write_length_prefixed(writer: asyncio.StreamWriter, payloads) -> asyncio.Future:
    """Write each payload after its 8-byte length; returns the pending drain()."""
    for payload in payloads:
        writer.write(len(payload).to_bytes(8, "big") + payload)
    return asyncio.ensure_future(writer.drain())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_mixed_small_and_large_payloads_arrive_in_order(loop_kind, tmp_path):
    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((_, client_writer), (reader, _)):
            payloads = [os.urandom(n) for n in (5, 3 * 2**20, 100, 2**16, 2**16 + 1, 7 * 2**20 + 3)]
            drain = write_length_prefixed(client_writer, payloads)
            for payload in payloads:
                length = int.from_bytes(await reader.readexactly(8), "big")
                assert bytes(await reader.read_payload(length)) == payload
            await drain
            client_writer.close()
            assert await reader.read() == b""

    run_in_loop(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_back_to_back_large_payloads_bypass_the_scratch_buffer(loop_kind, tmp_path):
    """After a large payload only a header-sized read goes through the scratch buffer, not the next payload."""

    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((_, client_writer), (reader, _)):
            payloads = [os.urandom(2**20 + n) for n in range(4)] + [b"small", os.urandom(2**18)]
            drain = write_length_prefixed(client_writer, payloads)  # everything is in the socket before the first read
            fed = []
            feed_data = reader.feed_data
            reader.feed_data = lambda data: (fed.append(len(data)), feed_data(data))
            for index, payload in enumerate(payloads):
                length = int.from_bytes(await reader.readexactly(8), "big")
                fed_before = sum(fed)
                assert bytes(await reader.read_payload(length)) == payload
                if index > 0:  # the bytes that went through the scratch buffer while this frame was read
                    assert sum(fed) - fed_before <= streams.BOUNDARY_READ_BYTES
            await drain
            client_writer.close()
            assert await reader.read() == b""

    run_in_loop(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_peer_closed_completely_tells_a_half_close_from_a_close(loop_kind, tmp_path):
    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((client_reader, client_writer), (_, server_writer)):
            assert not streams.peer_closed_completely(client_writer)
            server_writer.write_eof()  # the server ends its writing, as p2pd does when a stream ends
            assert await client_reader.read() == b""
            assert not streams.peer_closed_completely(client_writer)
            server_writer.close()
            await asyncio.sleep(0.05)
            assert streams.peer_closed_completely(client_writer)
            client_writer.close()
            assert streams.peer_closed_completely(client_writer)  # a closed socket cannot be asked: assume the worst

    run_in_loop(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_eof_inside_a_payload_is_an_incomplete_read(loop_kind, tmp_path):
    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((_, client_writer), (reader, _)):
            client_writer.write(b"x" * 1000)
            await client_writer.drain()
            client_writer.close()
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await reader.read_payload(2**20)
            assert info.value.partial == b"x" * 1000 and info.value.expected == 2**20

    run_in_loop(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancelled_payload_read_keeps_received_bytes(loop_kind, tmp_path):
    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((_, client_writer), (reader, _)):
            first_part = os.urandom(300_000)
            client_writer.write(first_part)
            await client_writer.drain()
            read = asyncio.ensure_future(reader.read_payload(2**20))
            await asyncio.sleep(0.2)
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            rest = os.urandom(2**20 - len(first_part))
            client_writer.write(rest)
            await client_writer.drain()
            assert bytes(await reader.read_payload(2**20)) == first_part + rest
            client_writer.close()

    run_in_loop(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_writer_flow_control_and_close(loop_kind, tmp_path):
    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((client_reader, client_writer), (_, writer)):
            big = os.urandom(16 * 2**20)
            writer.write(big)  # far more than the socket buffers: drain() must wait for the reader
            drain = asyncio.ensure_future(writer.drain())
            assert bytes(await client_reader.read_payload(len(big))) == big
            await drain
            writer.close()
            await writer.wait_closed()
            assert await client_reader.read() == b""
            client_writer.close()

    run_in_loop(loop_kind, scenario)
