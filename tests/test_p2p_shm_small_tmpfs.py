"""Shared-memory stream pipes on a small tmpfs (as /dev/shm is in containers): p2pd offers a pipe only when it can
reserve its pages, and every other stream keeps its socket; nothing is killed by SIGBUS.

The tests mount their own tmpfs (root only) and point ``HIVEMIND_P2P_SHM_DIR`` of the daemons and the client to it.
"""

import asyncio
import hashlib
import os
import subprocess
import sys

import pytest

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings import shm_pipe
from hivemind.utils.asyncio import await_with_timeout

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared-memory pipes are Linux-only")

PIPE_FILE_SIZE = 2 * (4 << 20)  # two rings of p2pd's ring size


@pytest.fixture
def small_tmpfs(tmp_path, monkeypatch, request):
    """A tmpfs of request.param MiB that the daemons started in the test keep their pipe files in."""
    directory = tmp_path / "shm"
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}m,mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    monkeypatch.setenv(shm_pipe.SHM_DIR_ENV_VAR, str(directory))
    try:
        yield str(directory)
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


async def echo_with_digest(reader, writer):
    """Echo everything back, then a 32-byte SHA-256 of what was received."""
    digest = hashlib.sha256()
    while chunk := await reader.read(1 << 20):
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write(digest.digest())
    await writer.drain()
    writer.close()


async def run_concurrent_echoes(directory: str, streams: int, size: int):
    """Open `streams` streams at once, then echo `size` random bytes through each; returns which ends used pipes."""
    callee = await P2P.create()
    caller = await P2P.create(initial_peers=await callee.get_visible_maddrs())
    handler_ends = []
    every_handler_started = asyncio.Event()
    try:

        async def handler(stream_info, reader, writer):
            handler_ends.append(writer.transport.get_extra_info("shm_pipe") is True)
            if len(handler_ends) == streams:
                every_handler_started.set()
            await echo_with_digest(reader, writer)

        await callee.add_binary_stream_handler("echo", handler)
        opened = await asyncio.gather(
            *(caller.call_binary_stream_handler(callee.peer_id, "echo") for _ in range(streams))
        )
        caller_ends = [writer.transport.get_extra_info("shm_pipe") is True for _, _, writer in opened]

        async def exchange(reader, writer):
            payload = os.urandom(size)
            writer.write(payload[:1])  # the handler's end of a stream may open only with its first bytes
            await writer.drain()
            # no stream ends (and frees its pipe file) before every end of every stream has been offered one, so the
            # pipes counted are pipes held at the same time
            await await_with_timeout(every_handler_started.wait(), 30)
            writer.write(payload[1:])
            writer.write_eof()
            echoed = await reader.readexactly(size)
            digest = await reader.readexactly(32)
            writer.close()
            return echoed == payload and digest == hashlib.sha256(payload).digest()

        results = await asyncio.gather(*(exchange(reader, writer) for _, reader, writer in opened))
        assert all(results), f"{results.count(False)} of {streams} streams delivered wrong bytes"
        assert caller._daemon.is_running and callee._daemon.is_running, "a daemon died during the transfers"
        return caller_ends, handler_ends
    finally:
        await caller.shutdown()
        await callee.shutdown()
        assert os.listdir(directory) == [], "pipe files outlived their daemons"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("small_tmpfs", [32], indirect=True)
async def test_streams_beyond_the_tmpfs_space_fall_back_to_sockets(small_tmpfs):
    # 32 MiB hold four 8 MiB pipe files. Keeping half of the tmpfs free is a courtesy that each daemon keeps for its
    # own pipes (it counts the files it is still reserving), but the two daemons here check on their own: when both
    # create their first two at the same moment, all four that fit may be taken. Reserving the pages is the guard
    caller_ends, handler_ends = await run_concurrent_echoes(small_tmpfs, streams=32, size=1 << 20)
    ends = caller_ends + handler_ends
    assert len(ends) == 64
    assert 1 <= ends.count(True) <= 32 // 8, f"{ends.count(True)} stream ends used a pipe on a 32 MiB tmpfs"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("small_tmpfs", [2], indirect=True)
async def test_a_tmpfs_too_small_for_any_pipe_keeps_every_stream_on_its_socket(small_tmpfs):
    caller_ends, handler_ends = await run_concurrent_echoes(small_tmpfs, streams=8, size=1 << 20)
    assert caller_ends + handler_ends == [False] * 16
