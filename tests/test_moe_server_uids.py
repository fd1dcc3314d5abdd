"""Hosted uids must be announceable: one invalid uid made every DHT declaration of the server fail (silently)."""

import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.server import Server
from hivemind.moe.server.dht_handler import get_experts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor

LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], device="cpu")


@pytest.mark.timeout(60)
def test_directory_of_checkpoint_dir_that_is_not_a_uid_is_ignored_and_the_experts_are_announced(tmp_path):
    (tmp_path / "lost+found").mkdir()  # e.g. a dedicated checkpoint volume
    server = Server.create(num_experts=2, hidden_dim=8, checkpoint_dir=tmp_path, start=True, **LOOPBACK)
    try:
        assert sorted(server.module_backends) == ["expert.0", "expert.1"]
        deadline = time.monotonic() + 10
        while True:  # the first declaration runs right after start
            found = get_experts(server.dht, ["expert.0", "expert.1"])
            if all(found) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert all(expert is not None for expert in found)
    finally:
        server.shutdown()


def test_invalid_expert_uids_are_refused_before_starting_anything():
    with pytest.raises(ValueError, match=r"invalid expert uids \['expert_0'\]"):
        Server.create(expert_uids=["expert.1", "expert_0"], hidden_dim=8, start=False, **LOOPBACK)


@pytest.mark.timeout(30)
def test_server_refuses_backends_under_an_invalid_uid():
    backend = ModuleBackend(
        "my expert", torch.nn.Linear(2, 2), args_schema=(BatchTensorDescriptor(2),), max_batch_size=4
    )
    dht = DHT(start=False)
    with pytest.raises(ValueError, match=r"invalid expert uids \['my expert'\]"):
        Server(dht, {"my expert": backend})
