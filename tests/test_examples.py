"""The scripts in examples/ run to completion and print what they promise."""

import os
import signal
import subprocess
import sys
import time

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.timeout(60)
def test_dht_store_get_example():
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "dht_store_get.py")], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr
    assert "greeting -> ValueWithExpiration(value='hello, swarm'" in result.stdout
    assert "scores -> {'alice': 0.93}" in result.stdout


@pytest.mark.timeout(90)
def test_averaging_example():
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "averaging.py")], capture_output=True, text=True, timeout=80
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("averaged in a group of 4") == 4
    assert "every model now holds the mean of the four" in result.stdout
    assert "newcomer downloaded 2 tensors with metadata {'group_key': ''}" in result.stdout


@pytest.mark.timeout(120)
def test_moe_example():
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "moe.py"), "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr
    assert "hosts 4 experts: expert.0.0, expert.0.1, expert.1.0, expert.1.1" in result.stdout
    assert "the loss went down" in result.stdout


@pytest.mark.timeout(60)
def test_moe_example_refuses_a_number_of_steps_below_one():
    # --steps 0 started the server and the trainer, then failed with ZeroDivisionError (no loss to average)
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "moe.py"), "--steps", "0"], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--steps must be at least 1, got 0" in result.stderr
    assert "hosts 4 experts" not in result.stdout


@pytest.mark.timeout(120)  # (it took 39 s with both cores busy: moe.py builds and trains before 'done in')
def test_a_ctrl_c_just_after_an_example_finished_prints_no_traceback():
    # the example's handler turned it into a KeyboardInterrupt inside the interpreter's exit: 'Exception ignored in
    # atexit callback ... torch/library.py ... KeyboardInterrupt' (3 runs of 3)
    process = subprocess.Popen(
        [sys.executable, "-u", os.path.join(EXAMPLES, "moe.py"), "--steps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("done in"):
            time.sleep(0.05)  # past the end of main(): while the interpreter exits
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=50)
    assert process.returncode in (0, 130), stderr[-2000:]  # 130: a stalled process was still in main()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
