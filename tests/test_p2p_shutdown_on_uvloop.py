"""A P2P shut down on uvloop while its event loop goes on (hivemind's own processes run on uvloop).

uvloop closes a read pipe's file descriptor one loop iteration after ``transport.close()``; p2pd's output pipe used to
be closed by hand right after that, so a socket opened next could get the same number, and uvloop then closed that
socket instead ("Bad file descriptor" for a control connection of another P2P), or libuv aborted the whole process
("Fatal Python error: Aborted") when it dropped the old number from its epoll set."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, socket, uvloop
    from hivemind.p2p import P2P

    async def main():
        staying = await P2P.create()
        for _ in range(3):
            leaving = await P2P.create(initial_peers=await staying.get_visible_maddrs())
            await leaving.shutdown()
            # new sockets in the loop right away: one gets the number of the output pipe just closed
            pairs = [socket.socketpair() for _ in range(16)]
            writers = [(await asyncio.open_connection(sock=first))[1] for first, _ in pairs]
            await staying.list_peers()
            for writer, (_, second) in zip(writers, pairs):
                writer.close()
                second.close()
        await staying.shutdown()
        print("done")

    uvloop.install()
    asyncio.run(main())
    """
)


@pytest.mark.timeout(90)
def test_p2p_shutdown_on_uvloop_keeps_the_process_alive():
    pytest.importorskip("uvloop")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=80)
    assert result.returncode == 0 and "done" in result.stdout, (
        f"the process ended with {result.returncode}: {result.stderr[-2000:]}"
    )
