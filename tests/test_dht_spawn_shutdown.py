"""Shutdown of a DHT process that has torch loaded, as the DHT process of a training script has: with spawn, it
re-imports the script (and torch with it)."""

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
    import hivemind
    from hivemind.p2p.p2p_daemon_bindings.control import unix_socket_path

    if __name__ == "__mp_main__":  # only in the spawned DHT process (the script itself need not pay for it too)
        import torch  # noqa: F401 - a training script's import


    async def daemon_socket(dht, node):
        return unix_socket_path(node.p2p.daemon_listen_maddr)


    async def torch_loaded(dht, node):
        return "torch" in sys.modules


    if __name__ == "__main__":
        dht = hivemind.DHT(start=True, start_method=sys.argv[1], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        daemons = [child.pid for child in psutil.Process(dht.pid).children() if child.name() == "p2pd"]
        paths = [dht.run_coroutine(daemon_socket), dht._socket_address]
        torch_in_dht = dht.run_coroutine(torch_loaded)
        started = time.perf_counter()
        dht.shutdown()
        elapsed = time.perf_counter() - started
        alive = [pid for pid in daemons if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        left = [path for path in paths if os.path.exists(path)]
        report = dict(elapsed=elapsed, exitcode=dht.exitcode, daemons=daemons, alive=alive, left=left)
        print(json.dumps(dict(report, torch=torch_in_dht)))
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_dht_process_that_imported_torch_shuts_down_promptly_and_cleanly(tmp_path, start_method):
    # a spawned DHT process used to finalize its whole interpreter (torch included) after its clean-up: 0.7-1.8 s on
    # a 2-core machine, past shutdown_timeout (3 s) under load, after which it was terminated. The fork variant
    # checks the same clean-up for a forked DHT process (which never finalized its interpreter)
    script = tmp_path / "train_like.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), start_method], capture_output=True, text=True, timeout=80, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch"] == (start_method == "spawn")  # what made the spawned DHT process slow to exit
    assert report["exitcode"] == 0
    assert len(report["daemons"]) == 1, "the DHT process should have started one p2pd"
    assert report["alive"] == [], "p2pd outlived the DHT process"
    assert report["left"] == [], "socket files were left behind"
    assert "did not shut down" not in result.stderr
    assert report["elapsed"] < 1.0, f"the DHT process took {report['elapsed']:.2f} s to shut down"
