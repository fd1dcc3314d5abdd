"""A script that enters ``background_server`` and exits without leaving the block (an exception in a notebook-style
script, a ``__enter__`` without ``__exit__``): it exits promptly and stops the server, instead of multiprocessing's
exit hook waiting forever to join a server process that waited for the script to tell it to stop."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.freeze import still_running

SCRIPT = textwrap.dedent(
    """
    import json

    import psutil

    from hivemind.moe.server import background_server

    if __name__ == "__main__":
        block = background_server(num_experts=1, hidden_dim=8, num_handlers=1, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        block.__enter__()
        print(json.dumps([child.pid for child in psutil.Process().children(recursive=True)]), flush=True)
    """
)


@pytest.mark.timeout(90)
def test_script_that_never_leaves_the_block_exits_and_stops_the_server(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(script)], stdout=stdout, stderr=stderr, cwd=tmp_path)
        try:
            returncode = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = "hung"
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines, f"the script failed before starting the server: {(tmp_path / 'stderr').read_text()[-3000:]}"
    children = json.loads(lines[-1])
    survivors = still_running(children, timeout=10)
    assert returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert len(children) >= 3 and survivors == [], children  # the server's process, its DHT process and p2pd
