"""Helpers for tests of our asyncio streams: both event loops, and a connected pair of unix-socket streams."""

import asyncio
import contextlib

import pytest

from hivemind.p2p.p2p_daemon_bindings import streams

LOOPS = ["asyncio", "uvloop"]


def run_in_loop(loop_kind: str, coroutine_function, *args):
    """Run ``coroutine_function(*args)`` in a new asyncio or uvloop event loop, within 20 seconds."""
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coroutine_function(*args), 20))
    finally:
        loop.close()


@contextlib.asynccontextmanager
async def connected_pair(path: str, limit: int = 2**20):
    """((reader, writer) of the client side, (reader, writer) of the server side); both closed on exit."""
    accepted = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        accepted.set_result((reader, writer))  # the test owns the server side of the stream from now on

    server = await streams.start_unix_server(on_connect, path, limit=limit)
    client = await streams.open_unix_connection(path, limit=limit)
    server_side = await accepted
    try:
        yield client, server_side
    finally:
        client[1].close()
        server_side[1].close()
        server.close()
        await server.wait_closed()
