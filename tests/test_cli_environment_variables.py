"""The environment variables of the README name themselves when their value cannot be used."""

import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_an_unusable_dht_num_workers_is_named(value):
    result = subprocess.run(
        [sys.executable, "-c", "import hivemind"], capture_output=True, text=True, timeout=50,
        env=dict(os.environ, HIVEMIND_DHT_NUM_WORKERS=value),
    )  # fmt: skip
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: HIVEMIND_DHT_NUM_WORKERS=") and "positive integer" in last_line, last_line


@pytest.mark.timeout(60)
def test_a_usable_dht_num_workers_is_the_default_of_num_workers():
    code = "import inspect, hivemind; print(inspect.signature(hivemind.DHT).parameters['num_workers'].default)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50,
        env=dict(os.environ, HIVEMIND_DHT_NUM_WORKERS=" 7 "),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7"
