"""A starting connection handler is watched from the server's thread while the user's thread may be in shutdown():
the watch tells that the handler's process ended without reaping it, so that join() there still gets its exit code
(a second ``waitpid`` made join() see "no such child", report the process as alive and terminate it with a warning)."""

import os

import pytest

from hivemind.dht import DHT
from hivemind.moe.server import ConnectionHandler


class ExitsAtStart(ConnectionHandler):
    def run(self):
        os._exit(3)


@pytest.mark.timeout(30)
def test_handler_that_died_at_start_is_left_for_join_to_reap():
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    handler = ExitsAtStart(dht, {})
    try:
        with pytest.raises(RuntimeError, match=r"stopped before it was ready \(exit code 3\)"):
            handler.run_in_background(await_ready=True, timeout=20)
        # still a zombie: only the handler's own join() reaps it
        assert os.waitid(os.P_PID, handler.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        handler.join(5)
        assert handler.exitcode == 3
    finally:
        handler.shutdown()
        dht.shutdown()
