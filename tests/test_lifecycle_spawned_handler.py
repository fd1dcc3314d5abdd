"""A connection handler process started with ``spawn`` (the CUDA-safe method) stops promptly when shut down."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.server import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor

_finalization_probe = None  # (in the handler's process) an object that only the interpreter's finalization deletes


class _WritesWhenFinalized:
    def __init__(self, path: str):
        self.path = path

    def __del__(self, _open=os.open, _close=os.close, _flags=os.O_CREAT | os.O_WRONLY):
        _close(_open(self.path, _flags))  # (names bound early: module globals may be gone by then)


class SpawnedHandler(ConnectionHandler):
    probe_path = None

    def _Popen(self, process_obj):
        return mp.get_context("spawn").Process._Popen(process_obj)

    def run(self):
        global _finalization_probe
        _finalization_probe = _WritesWhenFinalized(self.probe_path)
        super().run()


@pytest.mark.timeout(120)
def test_spawned_handler_process_ends_right_after_its_clean_up(tmp_path):
    # after its clean-up, the spawned process finalized its whole interpreter (torch included): 0.5-1.6 s on a busy
    # 2-core machine, so that Server.shutdown() warned "did not stop within 3 s" and terminated it under more load
    schema = (BatchTensorDescriptor(2),)
    backend = ModuleBackend("expert.0", torch.nn.Linear(2, 2), args_schema=schema, max_batch_size=4)
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
        handler = SpawnedHandler(dht, {"expert.0": backend})
        handler.probe_path = str(tmp_path / "finalized")
        try:
            handler.run_in_background(await_ready=True, timeout=100)
        finally:
            started = time.perf_counter()
            handler.shutdown()
            elapsed = time.perf_counter() - started
    assert handler.exitcode == 0
    assert not (tmp_path / "finalized").exists(), "the handler's process finalized its interpreter after clean-up"
    assert elapsed < 1.0, f"the spawned handler took {elapsed:.2f} s to stop"
