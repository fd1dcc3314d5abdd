"""The Go unit tests of our p2pd (codecs, scheduler defaults) pass with the Go that builds the daemon."""

import os
import shutil
import subprocess

import pytest

P2PD_SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "p2pd")


@pytest.mark.timeout(300)
def test_go_unit_tests_pass():
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (p2pd came prebuilt through HIVEMIND_P2PD_PATH)")
    env = dict(os.environ, CGO_ENABLED=os.environ.get("CGO_ENABLED", "0"))
    result = subprocess.run(
        [go, "test", "-count=1", "./..."], cwd=P2PD_SOURCE_DIR, env=env, capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 0, f"go test failed:\n{result.stdout}\n{result.stderr}"
    assert "ok" in result.stdout
