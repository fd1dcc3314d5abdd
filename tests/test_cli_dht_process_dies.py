"""hivemind-dht whose DHT process dies (killed, out of memory) exits with status 1 and an error line that says so."""

import psutil
import pytest
from test_cli_dht import CLIPeer


@pytest.mark.timeout(60)
def test_the_tool_says_its_dht_process_ended_when_it_is_killed():
    peer = CLIPeer("--refresh_period", "1")
    try:
        peer.wait_for(r"Local storage contains 0 keys$", timeout=40)
        children = psutil.Process(peer.process.pid).children(recursive=True)
        dht_processes = [child for child in children if any(grand.name() == "p2pd" for grand in child.children())]
        assert len(dht_processes) == 1, children
        dht_processes[0].kill()
        assert peer.process.wait(timeout=30) == 1
        error = peer.wait_for(r"\[ERROR\] .*; exiting")
        assert "DHT process was killed by signal SIGKILL" in error.string, error.string
        assert not any("Traceback" in line for line in peer.lines), "\n".join(peer.lines)
    finally:
        peer.kill()
