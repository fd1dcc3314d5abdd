"""hivemind-dht whose DHT process dies right after it started says so and exits 1, without a traceback."""

import pytest
from cli_helpers import run_with_dht_killed_on_address_read


@pytest.mark.timeout(120)
def test_a_dht_process_killed_before_the_addresses_are_read_is_reported_without_a_traceback():
    args = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0"]
    result = run_with_dht_killed_on_address_read("hivemind.hivemind_cli.run_dht", args, timeout=100)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "DHT process" in errors[0] and "SIGKILL" in errors[0], result.stderr
    assert errors[0].endswith("exiting. Start hivemind-dht again"), errors[0]
