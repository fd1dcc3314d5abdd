"""A SIGTERM that reaches a process and its p2pd at once (a service manager stopping the program) is a shutdown: the
owner does not log p2pd's exit as an unexpected failure."""

import pytest
from signals_helpers import SessionProcess

OWNER_AND_DAEMON_GET_SIGTERM = """
import asyncio, os, signal
from hivemind.p2p import P2P
from hivemind.utils.graceful_sigterm import GracefulSigterm

async def main():
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    stop = asyncio.Event()
    GracefulSigterm(asyncio.get_running_loop(), stop, grace=20).install().serving()
    os.killpg(0, signal.SIGTERM)  # this process and its p2pd
    await stop.wait()
    exited = await p2p._daemon.wait_exited(timeout=10)  # its exit is noticed before this process shuts P2P down
    print("p2pd exited:", exited, flush=True)
    await p2p.shutdown()
    print("shut down", flush=True)

asyncio.run(main())
"""


@pytest.mark.timeout(30)
def test_p2pd_stopped_by_the_same_sigterm_is_not_reported_as_a_failure():
    owner = SessionProcess(OWNER_AND_DAEMON_GET_SIGTERM)
    try:
        assert owner.finish(timeout=25) == 0, owner.output()
        assert owner.lines[-2:] == ["p2pd exited: True", "shut down"], owner.output()
        assert "ERROR" not in owner.output() and "Traceback" not in owner.output(), owner.output()
        assert owner.leftovers() == [], owner.output()
    finally:
        owner.close()
