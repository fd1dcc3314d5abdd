"""Shutdown of a DHT process started from a script that imports torch, as training scripts do: with spawn, the DHT
process re-imports that script (and torch with it)."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys
    import time

    import psutil
    import torch  # noqa: F401 - the spawned DHT process imports it too, like a training script's
    import hivemind
    from hivemind.p2p.p2p_daemon_bindings.control import unix_socket_path


    async def daemon_socket(dht, node):
        return unix_socket_path(node.p2p.daemon_listen_maddr)


    if __name__ == "__main__":
        dht = hivemind.DHT(start=True, start_method=sys.argv[1], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        daemons = [child.pid for child in psutil.Process(dht.pid).children() if child.name() == "p2pd"]
        paths = [dht.run_coroutine(daemon_socket), dht._socket_address]
        started = time.perf_counter()
        dht.shutdown()
        elapsed = time.perf_counter() - started
        alive = [pid for pid in daemons if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        left = [path for path in paths if os.path.exists(path)]
        print(json.dumps(dict(elapsed=elapsed, exitcode=dht.exitcode, daemons=daemons, alive=alive, left=left)))
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_dht_process_that_imported_torch_shuts_down_promptly_and_cleanly(tmp_path, start_method):
    # a spawned DHT process used to finalize its whole interpreter (torch included) after its clean-up: 0.7-1.2 s on
    # an idle 2-core machine, past shutdown_timeout (3 s) under load, after which it was terminated
    script = tmp_path / "train_like.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), start_method], capture_output=True, text=True, timeout=80, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["exitcode"] == 0
    assert len(report["daemons"]) == 1, "the DHT process should have started one p2pd"
    assert report["alive"] == [], "p2pd outlived the DHT process"
    assert report["left"] == [], "socket files were left behind"
    assert "did not shut down" not in result.stderr
    assert report["elapsed"] < 0.5, f"the DHT process took {report['elapsed']:.2f} s to shut down"
