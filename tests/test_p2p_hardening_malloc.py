"""glibc malloc tuning stays in the processes the library owns: the DHT process tunes, the creating one does not."""

import os
import platform

import pytest

from hivemind.dht import DHT
from hivemind.utils import malloc_tuning

pytestmark = [
    pytest.mark.skipif(
        platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only"
    ),
    pytest.mark.timeout(60),
]


async def _tuning_state(dht: DHT, node) -> bool:
    return malloc_tuning._applied


def test_dht_process_tunes_malloc_and_leaves_its_creator_alone(monkeypatch):
    monkeypatch.delenv(malloc_tuning.TUNE_MALLOC_ENV_VAR, raising=False)
    for name in malloc_tuning.GLIBC_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    state_before = malloc_tuning._applied
    dht = DHT(start=True)
    try:
        assert dht.run_coroutine(_tuning_state) is True
        assert os.getpid() != dht.pid
    finally:
        dht.shutdown()
    assert malloc_tuning._applied is state_before  # creating a DHT (and its P2P) did not retune this process
