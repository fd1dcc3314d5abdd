"""The user's script ends without calling shutdown(): its interpreter exits promptly and takes the DHT and averager
processes (and their p2pd) with it, whether they are daemonic or not."""

import json
import subprocess
import sys
import textwrap

import psutil
import pytest

SCRIPT = textwrap.dedent(
    """
    import json

    import psutil
    import torch

    import hivemind

    dht = hivemind.DHT(start=True, daemon=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    averager = hivemind.DecentralizedAverager(
        [torch.zeros(3)], dht, prefix="exit", start=True, target_group_size=2, daemon=False
    )
    print(json.dumps([child.pid for child in psutil.Process().children(recursive=True)]), flush=True)
    """
)


@pytest.mark.timeout(60)
def test_script_with_non_daemonic_processes_exits_without_shutdown(tmp_path):
    # multiprocessing joins non-daemonic children at exit, and these waited for their creator: the script hung forever
    script = tmp_path / "forgets_shutdown.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(script)], stdout=stdout, stderr=stderr, cwd=tmp_path)
        try:
            returncode = process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            returncode = None
        children = json.loads((tmp_path / "stdout").read_text().splitlines()[-1])
        survivors = [psutil.Process(pid) for pid in children if psutil.pid_exists(pid)]
        for leftover in [process] + survivors:
            try:
                leftover.kill()
            except (psutil.Error, ProcessLookupError):
                pass
    stderr_text = (tmp_path / "stderr").read_text()
    assert returncode == 0, f"the script did not exit by itself: {stderr_text[-2000:]}"
    assert "Traceback" not in stderr_text and "WARN" not in stderr_text, stderr_text[-2000:]
