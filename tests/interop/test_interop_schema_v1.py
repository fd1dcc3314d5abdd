"""SchemaValidator accepts and refuses the same records for pydantic.v1 schemas in both implementations.

A grid of field types (plain, Strict*, constrained, Optional, nested containers and models), subkeys and values is
validated by each implementation in its own interpreter (tests/interop/schema_v1_grid.py); the outcomes must agree.
"""

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from .harness import check_implementation, process_env, python_command

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

GRID_SCRIPT = Path(__file__).resolve().with_name("schema_v1_grid.py")


def run_grid(implementation: str) -> dict:
    proc = subprocess.run(
        [*python_command(implementation), str(GRID_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tempfile.gettempdir(),  # never a directory holding a `hivemind` package
        env=process_env(implementation),
    )
    assert proc.returncode == 0, f"{implementation} grid failed:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    check_implementation(implementation, report["version"], report["file"])
    return report["results"]


def test_v1_schema_outcomes_match_the_original(original_env):
    original, ours = run_grid("original"), run_grid("ours")
    assert original.keys() == ours.keys() and len(original) > 4000
    # the original raises on a few inputs instead of answering; refusing them is what matters
    original = {case: outcome is True for case, outcome in original.items()}
    differences = {case: (original[case], ours[case]) for case in original if original[case] != (ours[case] is True)}
    report = "\n".join(f"  {case}: original {o}, ours {u}" for case, (o, u) in sorted(differences.items())[:50])
    assert not differences, f"{len(differences)} outcomes differ (original, ours):\n{report}"
