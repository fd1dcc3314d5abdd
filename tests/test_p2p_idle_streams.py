"""Idle stream connections cost the client process little: no receive buffer of their own per connection."""

import asyncio
import tracemalloc

import pytest
from unix_socket_pair import LOOPS, connected_pair, run_in_loop

from hivemind.p2p.p2p_daemon_bindings import streams

CONNECTIONS = 100


def test_protocols_share_the_receive_scratch_buffer():
    # a remote peer opens streams for the price of a few bytes each; p2pd hands each one to the client on its own
    # connection, so a per-connection 64 KiB buffer made the client commit ~64 KiB per idle stream
    loop = asyncio.new_event_loop()
    try:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            protocols = [
                streams.DirectReadProtocol(streams.DirectStreamReader(limit=2**16, loop=loop), loop=loop)
                for _ in range(CONNECTIONS)
            ]
            per_connection = (tracemalloc.get_traced_memory()[0] - before) / len(protocols)
        finally:
            tracemalloc.stop()
    finally:
        loop.close()
    assert per_connection < 8 * 1024, f"each connection took {per_connection / 1024:.1f} KiB"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_interleaved_connections_receive_their_own_bytes(loop_kind, tmp_path):
    async def main():
        async with connected_pair(str(tmp_path / "a.sock")) as ((_, writer_a), (reader_a, _)):
            async with connected_pair(str(tmp_path / "b.sock")) as ((_, writer_b), (reader_b, _)):
                for i in range(50):
                    writer_a.write(b"a" * (1000 + i))
                    writer_b.write(b"b" * (2000 + i))
                    chunk_a = await reader_a.readexactly(1000 + i)
                    chunk_b = await reader_b.readexactly(2000 + i)
                    assert chunk_a == b"a" * (1000 + i) and chunk_b == b"b" * (2000 + i)

    run_in_loop(loop_kind, main)
