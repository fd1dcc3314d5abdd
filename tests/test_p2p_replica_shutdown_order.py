"""A replica's shutdown closes its callback socket before it asks the daemon to remove its stream handlers.

The removal is a round trip to a daemon that may be slow (stalled, overloaded) and a caller may bound shutdown()
(an averager process gives it 1 s): before, the socket stayed open and its file stayed in the temporary directory
when that bound cut the removal short, and the client counted as closed (a second shutdown() did nothing).
"""

import asyncio
import contextlib
import os
import signal
import socket

import pytest

from hivemind.p2p import P2P
from hivemind.utils.asyncio import await_with_timeout

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="tells a stopped process through /proc"),
]


async def stop_process(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":  # stopped: answers nothing
        await asyncio.sleep(0.01)


def accepts_connections(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


async def serve_nothing(info, reader, writer):
    writer.close()


async def test_shutdown_cut_short_by_a_stalled_daemon_still_closes_the_callback_socket(p2p_pair):
    owner, _ = p2p_pair
    replica = await P2P.replicate(owner.daemon_listen_maddr)
    await replica.add_binary_stream_handler("stalled_daemon_name", serve_nothing)
    path = replica._client.listen_path
    assert accepts_connections(path)
    try:
        await stop_process(owner._daemon.pid)  # it accepts control connections but answers nothing
        with contextlib.suppress(asyncio.TimeoutError):
            await await_with_timeout(replica.shutdown(), 0.8)  # cut short within its removal (1 s)
    finally:
        os.kill(owner._daemon.pid, signal.SIGCONT)
    assert not os.path.exists(path) and not accepts_connections(path)
