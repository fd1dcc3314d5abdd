"""A short, seeded run of benchmarks/fuzz_decoders.py: no decoder that reads network bytes crashes, hangs or lets an
exception escape that is not its layer's own way of refusing input."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "fuzz_decoders.py")
INPUTS_PER_TARGET = 150
SECONDS_PER_TARGET = 4  # a cap for slow machines; normally INPUTS_PER_TARGET is reached first

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytest.importorskip("hypothesis")
from fuzz_targets import build_targets  # noqa: E402

TARGETS = list(build_targets())


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    out = workdir / "results.json"
    command = [sys.executable, SCRIPT, "--seed", "1", "--json", str(out), "--findings-dir", str(workdir / "findings")]
    command += ["--seconds-per-target", str(SECONDS_PER_TARGET), "--max-inputs", str(INPUTS_PER_TARGET)]
    command += ["--hang-seconds", "30"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {result["target"]: result for result in json.loads(out.read_text())}, completed.stdout


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", TARGETS)
def test_decoder_refuses_fuzzed_input_with_its_own_errors(fuzz_results, target):
    results, table = fuzz_results
    result = results[target]
    assert result["crashes"] == 0 and result["hangs"] == 0, f"{target}: {result['crash_notes']}\n{table}"
    assert result["inputs"] > 0, f"{target} ran no input:\n{table}"
    assert not result["harness_errors"], f"the fuzz harness of {target} is broken: {result['harness_errors']}"
    assert not result["foreign"], f"{target} let foreign exceptions escape: {result['foreign']}\n{table}"
