"""examples/averaging.py, moe.py and dht_store_get.py under Ctrl-C (SIGINT to the whole process group): the peers
started so far are shut down, the last line is "interrupted", the exit code is 130, and nothing is left behind."""

import os
import signal

import pytest
from signals_helpers import SessionProcess

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def example_script(name: str, args=(), injected: str = "") -> str:
    """Code that runs examples/<name> as ``python examples/<name> args`` does, after ``injected`` code."""
    path = os.path.join(EXAMPLES, name)
    run = f"runpy.run_path({path!r}, run_name='__main__')"
    return f"{injected}\nimport runpy, sys\nsys.argv = {[path, *args]!r}\n{run}\n"


def assert_interrupted_cleanly(example: SessionProcess, returncode: int) -> None:
    assert returncode == 130, example.output()
    assert example.lines[-1] == "interrupted", example.output()
    assert "Traceback" not in example.output(), example.output()
    assert example.leftovers() == [], example.output()


# a second Ctrl-C while the example shuts its averagers down (the first one stopped the averaging round)
SECOND_CTRL_C_DURING_SHUTDOWN = """
import os, signal
from hivemind.averaging import DecentralizedAverager
_original_shutdown = DecentralizedAverager.shutdown

def _shutdown_after_another_ctrl_c(self):
    os.killpg(0, signal.SIGINT)
    _original_shutdown(self)

DecentralizedAverager.shutdown = _shutdown_after_another_ctrl_c
"""


@pytest.mark.timeout(90)
def test_averaging_example_ctrl_c_during_the_round_shuts_every_peer_down():
    example = SessionProcess(example_script("averaging.py"))
    try:
        example.wait_for(r"started 4 peers", timeout=80)  # the round takes at least min_matchmaking_time (2 s)
        example.signal_group(signal.SIGINT)
        assert_interrupted_cleanly(example, example.finish())
        assert not any("averaged in a group" in line for line in example.lines)
    finally:
        example.close()


@pytest.mark.timeout(90)
def test_averaging_example_second_ctrl_c_does_not_cut_the_shutdown_short():
    example = SessionProcess(example_script("averaging.py", injected=SECOND_CTRL_C_DURING_SHUTDOWN))
    try:
        example.wait_for(r"started 4 peers", timeout=80)
        example.signal_group(signal.SIGINT)
        assert_interrupted_cleanly(example, example.finish())
    finally:
        example.close()


@pytest.mark.timeout(60)
def test_dht_store_get_example_ctrl_c_shuts_both_peers_down():
    ctrl_c_at_first_store = """
import os, signal
import hivemind
_original_store = hivemind.DHT.store

def _store_after_ctrl_c(self, *args, **kwargs):
    os.killpg(0, signal.SIGINT)
    return _original_store(self, *args, **kwargs)

hivemind.DHT.store = _store_after_ctrl_c
"""
    example = SessionProcess(example_script("dht_store_get.py", injected=ctrl_c_at_first_store))
    try:
        assert_interrupted_cleanly(example, example.finish(timeout=50))
        assert not any(line.startswith("greeting ->") for line in example.lines)
    finally:
        example.close()


@pytest.mark.timeout(150)
def test_moe_example_ctrl_c_while_training_stops_trainer_and_server_without_tracebacks():
    example = SessionProcess(example_script("moe.py", ["--steps", "100000"]))
    try:
        example.wait_for(r"step   0: loss", timeout=120)
        example.signal_group(signal.SIGINT)
        assert_interrupted_cleanly(example, example.finish())  # the server's process printed no traceback either
    finally:
        example.close()
