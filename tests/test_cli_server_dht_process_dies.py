"""hivemind-server whose DHT process dies (killed, out of memory) says so, not only that p2pd stopped."""

import psutil
import pytest
from cli_helpers import run_with_dht_killed_on_address_read
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


@pytest.mark.timeout(180)
def test_a_dht_process_killed_before_the_address_hint_is_reported_without_a_traceback():
    """Seen once in a full run: the DHT process ended between 'Started' and the --initial_peers hint."""
    args = ["--expert_uids", "nop.0", "--expert_cls", "nop", "--hidden_dim", "4", "--device", "cpu",
            "--host_maddrs", "/ip4/127.0.0.1/tcp/0"]  # fmt: skip
    result = run_with_dht_killed_on_address_read("hivemind.hivemind_cli.run_server", args, timeout=150)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "[ERROR]" in line and "; exiting" in line]
    assert len(errors) == 1 and "DHT process" in errors[0] and "SIGKILL" in errors[0], result.stderr
    warnings = [line for line in result.stderr.splitlines() if "[WARN]" in line]
    assert any("Could not read this server's addresses for the --initial_peers hint" in w for w in warnings), warnings
