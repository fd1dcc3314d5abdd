"""tune_malloc_for_large_messages: large buffers freed and allocated again stop faulting in fresh pages.

The setting is process-wide, so every case runs in a fresh interpreter.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from hivemind.utils.malloc_tuning import TUNE_MALLOC_ENV_VAR

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only"
)

# allocates and frees three 1 MiB buffers per round, as one streamed 1 MiB message does; reports faults per round
MEASURE = """
import json, os, resource
from hivemind.utils.malloc_tuning import tune_malloc_for_large_messages

def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

applied = tune_malloc_for_large_messages()
again = tune_malloc_for_large_messages()
for _ in range(5):
    warm = [os.urandom(1 << 20) for _ in range(3)]
    del warm
before = minor_faults()
for _ in range(100):
    buffers = [bytes(1 << 20), bytes(1 << 20), bytearray(1 << 20)]
    del buffers
print(json.dumps({"applied": applied, "again": again, "faults_per_round": (minor_faults() - before) / 100}))
"""


def _env_without_malloc_settings(**overrides) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.update(overrides)
    return env


def _measure(**env_overrides) -> dict:
    env = _env_without_malloc_settings(**env_overrides)
    result = subprocess.run([sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tuned_process_reuses_freed_large_buffers():
    tuned = _measure()
    untuned = _measure(**{TUNE_MALLOC_ENV_VAR: "0"})
    assert tuned["applied"] and tuned["again"]
    assert not untuned["applied"]
    # 3 MiB per round is 768 pages: untuned, most of them fault in again; tuned, almost none
    assert untuned["faults_per_round"] > 100
    assert tuned["faults_per_round"] < 10


def test_explicit_glibc_settings_are_left_alone():
    assert not _measure(MALLOC_TRIM_THRESHOLD_="131072")["applied"]


P2P_CREATE = (
    "import asyncio, sys\n"
    "from hivemind.p2p import P2P\n"
    "from hivemind.utils import malloc_tuning\n"
    "async def main():\n"
    "    p2p = await P2P.create(**eval(sys.argv[1]))\n"
    "    await p2p.shutdown()\n"
    "asyncio.run(main())\n"
    "print(malloc_tuning._applied)\n"
)


def _tuned_by_p2p_create(create_kwargs: str, **env_overrides) -> str:
    env = _env_without_malloc_settings()
    env.pop(TUNE_MALLOC_ENV_VAR, None)
    env.update(env_overrides)
    command = [sys.executable, "-c", P2P_CREATE, create_kwargs]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_p2p_create_leaves_the_users_process_alone_by_default():
    assert _tuned_by_p2p_create("{}") == "None"  # never even tried


def test_p2p_create_applies_the_tuning_when_asked():
    assert _tuned_by_p2p_create("dict(tune_malloc=True)") == "True"
    assert _tuned_by_p2p_create("{}", **{TUNE_MALLOC_ENV_VAR: "1"}) == "True"
