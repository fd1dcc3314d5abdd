"""hivemind-server whose DHT process dies (killed, out of memory) says so, not only that p2pd stopped."""

import psutil
import pytest
from test_cli_server import CLIServer


@pytest.mark.timeout(180)
def test_the_server_says_its_dht_process_ended_when_it_is_killed():
    server = CLIServer("--expert_uids", "nop.0", "--expert_cls", "nop", "--hidden_dim", "4", "--device", "cpu",
                       "--host_maddrs", "/ip4/127.0.0.1/tcp/0")  # fmt: skip
    try:
        server.wait_for(r"\[INFO\] Started$")
        children = psutil.Process(server.process.pid).children(recursive=True)
        dht_processes = [child for child in children if any(grand.name() == "p2pd" for grand in child.children())]
        assert len(dht_processes) == 1, children
        dht_processes[0].kill()
        assert server.process.wait(timeout=60) == 1, server.rest_of_output()
        error = server.wait_for(r"\[ERROR\] .*; exiting")
        assert "DHT process" in error.string and "SIGKILL" in error.string, error.string
        assert "(see above)" not in error.string, error.string  # nothing above says why
    finally:
        server.kill()
