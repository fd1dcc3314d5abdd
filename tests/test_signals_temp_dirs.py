"""A library child process that sent torch tensors to another process (multiprocessing then creates its own
temporary directory for the descriptors) removes that directory when it exits."""

import multiprocessing
import os
import shutil
import tempfile

import pytest
import torch

import hivemind


async def shared_tensor(_dht, _node) -> torch.Tensor:
    return torch.arange(4.0).share_memory_()  # sent as a file descriptor: multiprocessing's resource sharer


@pytest.mark.timeout(30)
def test_dht_process_that_sent_a_shared_tensor_leaves_no_temporary_directory(monkeypatch):
    temporary = tempfile.mkdtemp(prefix="s8-", dir="/tmp")  # short: the DHT's Unix socket is made here too
    monkeypatch.setattr(tempfile, "tempdir", temporary)  # the forked DHT process makes its directories here
    # ...unless this process already has multiprocessing's directory (an earlier test in the same worker): the child
    # would inherit and use that one
    monkeypatch.delitem(multiprocessing.current_process()._config, "tempdir", raising=False)
    try:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            assert dht.run_coroutine(shared_tensor).tolist() == [0.0, 1.0, 2.0, 3.0]
            assert any(name.startswith("pymp-") for name in os.listdir(temporary))  # the case this test is about
        finally:
            dht.shutdown()
        assert dht.exitcode == 0
        assert sorted(os.listdir(temporary)) == []
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
