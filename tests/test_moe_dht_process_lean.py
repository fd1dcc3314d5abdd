"""The DHT process stays free of torch when mixtures, beam search, expert servers and optimizers use it.

Their coroutines (and the schema of training progress records) reach the DHT process pickled by reference, so the
DHT process imports the modules that define them and those modules' packages. When those imported torch, every DHT
process of a trainer that used a mixture grew from ~40 MiB to ~540 MiB (fork and spawn alike). The scenario runs in
a fresh interpreter (tests/dht_process_probe.py), whose DHTs start before it imports torch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.timeout(300)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_mixture_beam_search_server_and_progress_tracker_do_not_import_torch_in_the_dht_process(start_method):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    code = f"import json, dht_process_probe as p; print('REPORT', json.dumps(p.run_scenario({start_method!r})))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=280, env=env, cwd=TESTS.parent
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, (result.stdout + result.stderr)[-3000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    assert report["user_torch_at_start"] is False  # else a forked DHT process would inherit torch
    assert report["mixture_outputs"] == [3, 4]
    assert report["best"] == ["ffn.0.0", "ffn.1.1"] and report["initial_beam"] == 2 and report["successors"] == 1
    assert report["no_experts_error"].startswith("No responding experts found")
    for side in ("server", "client"):
        assert not report["before"][side]["torch"]
        after = report["after"][side]
        assert not after["torch"], (
            f"the {side} DHT process imported torch ({after['rss_mib']} MiB): {after['modules']}"
        )


# the names that 1.1.12 binds in these packages once imported (classes, functions and submodules)
NAMES_1_1_12 = {
    "hivemind.moe": "ModuleBackend RemoteExpert RemoteMixtureOfExperts RemoteSwitchMixtureOfExperts Server "
    "background_server client declare_experts expert_uid get_experts register_expert_class server",
    "hivemind.moe.client": "RemoteExpert RemoteMixtureOfExperts RemoteSwitchMixtureOfExperts beam_search expert moe "
    "remote_expert_worker switch_moe",
    "hivemind.moe.server": "ModuleBackend Server background_server checkpoints connection_handler declare_experts "
    "dht_handler get_experts layers module_backend register_expert_class runtime server task_pool",
    "hivemind.optim": "GradScaler Optimizer TrainingAverager grad_averager grad_scaler optimizer progress_tracker "
    "state_averager training_averager",
}


@pytest.mark.timeout(120)
def test_packages_and_dht_side_modules_import_without_torch_and_keep_every_1_1_12_name():
    code = f"""
import importlib, sys
light = [*{list(NAMES_1_1_12)!r}, "hivemind.moe.client.beam_search_dht", "hivemind.moe.server.dht_declarations",
         "hivemind.optim.progress_schema"]
for name in light:
    importlib.import_module(name)
assert "torch" not in sys.modules, "importing these modules imported torch"
missing = [f"{{package}}.{{name}}" for package, names in {NAMES_1_1_12!r}.items() for name in names.split()
           if not hasattr(importlib.import_module(package), name)]
from hivemind.moe import RemoteMixtureOfExperts, Server
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.moe.server.dht_handler import declare_experts
from hivemind.optim.progress_tracker import TrainingProgressSchema
assert "torch" in sys.modules
print("MISSING", missing)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MISSING []" in result.stdout, result.stdout
