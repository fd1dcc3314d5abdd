"""Public methods and attributes of hivemind 1.1.12 objects that code written for it may call: Blacklist.clear,
TimedStorage.frozen, ConnectionHandler.wait_until_ready, Optimizer.is_alive and hivemind.utils.logging.loglevel, with
the original's behaviour."""

import os
import subprocess
import sys

import pytest
import torch

import hivemind
from hivemind.dht.node import Blacklist
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import PeerID
from hivemind.utils.tensor_descr import BatchTensorDescriptor
from hivemind.utils.timed_storage import TimedStorage


def test_blacklist_clear_forgets_bans_and_failure_counts():
    blacklist = Blacklist(base_time=60, backoff_rate=2.0)
    peer = PeerID(b"x" * 34)
    blacklist.register_failure(peer)
    blacklist.register_failure(peer)
    assert peer in blacklist
    blacklist.clear()
    assert peer not in blacklist and len(blacklist) == 0
    assert blacklist.register_failure(peer) == 60  # counted as a first failure again


def test_timed_storage_frozen_is_true_inside_freeze_only():
    storage = TimedStorage()
    assert storage.frozen is False
    with storage.freeze():
        assert storage.frozen is True
        with storage.freeze():
            assert storage.frozen is True
        assert storage.frozen is True
    assert storage.frozen is False


@pytest.mark.timeout(60)
def test_connection_handler_wait_until_ready_after_a_background_start():
    dht = hivemind.DHT(start=True)
    backend = ModuleBackend(
        "expert.0",
        torch.nn.Linear(4, 4),
        args_schema=(BatchTensorDescriptor(4),),
        outputs_schema=BatchTensorDescriptor(4),
        max_batch_size=8,
    )
    handler = ConnectionHandler(dht, {"expert.0": backend})
    try:
        handler.run_in_background(await_ready=False)
        handler.wait_until_ready(timeout=30)
        assert handler.ready.done() and handler.ready.exception() is None and handler.is_alive()
    finally:
        handler.shutdown()
        dht.shutdown()
    assert not handler.is_alive()


@pytest.mark.timeout(60)
def test_optimizer_is_alive_until_shutdown():
    dht = hivemind.DHT(start=True)
    model = torch.nn.Linear(2, 2)
    optimizer = hivemind.Optimizer(
        dht=dht,
        run_id="is_alive",
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        target_batch_size=4,
        batch_size_per_step=1,
    )
    try:
        assert optimizer.is_alive() is True
    finally:
        optimizer.shutdown()
    assert optimizer.is_alive() is False
    dht.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "env_value, expected", [(None, "INFO"), ("DEBUG", "DEBUG"), ("debug", "DEBUG"), ("10", "DEBUG")]
)
def test_logging_loglevel_is_the_level_name_asked_by_hivemind_loglevel(env_value, expected):
    # petals' initialize_logs (run by `import petals`) reads it: hm_logging.loglevel != "DEBUG"
    env = {key: value for key, value in os.environ.items() if key != "HIVEMIND_LOGLEVEL"}
    if env_value is not None:
        env["HIVEMIND_LOGLEVEL"] = env_value
    script = (
        "from hivemind.utils import logging as hm_logging\n"
        "hm_logging.use_hivemind_log_handler('in_root_logger')\n"
        "level = 'FATAL' if hm_logging.loglevel != 'DEBUG' else 'DEBUG'\n"
        "hm_logging.get_logger('asyncio').setLevel(level)\n"
        "print(hm_logging.loglevel)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
