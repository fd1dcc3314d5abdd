"""Server.create saves the experts to checkpoint_dir at once (as hivemind 1.1.12 does), not only after update_period.

A server restarted before its first periodic save (a crash, a redeploy) finds the same experts: the same uids, even
when they were drawn at random from a pattern, and the same parameters.
"""

import pytest
import torch

from hivemind.moe.server import Server

LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], device="cpu")


def parameters_of(server: Server) -> dict:
    return {uid: [p.detach().clone() for p in b.module.parameters()] for uid, b in server.module_backends.items()}


@pytest.mark.timeout(90)
def test_experts_are_saved_at_creation_and_a_restart_before_the_first_period_finds_them(tmp_path):
    options = dict(expert_pattern="ffn.[0:100000]", num_experts=2, hidden_dim=8, checkpoint_dir=tmp_path)
    first = Server.create(update_period=3600, start=False, **options, **LOOPBACK)
    try:
        uids, parameters = sorted(first.module_backends), parameters_of(first)
        assert sorted(path.name for path in tmp_path.iterdir()) == uids
        assert all((tmp_path / uid / "checkpoint_last.pt").is_file() for uid in uids)
    finally:
        first.shutdown()  # before any periodic save

    torch.manual_seed(12345)  # other initial parameters, were the experts created anew
    second = Server.create(update_period=3600, start=False, **options, **LOOPBACK)
    try:
        assert sorted(second.module_backends) == uids
        restored = parameters_of(second)
        assert all(torch.equal(a, b) for uid in uids for a, b in zip(restored[uid], parameters[uid]))
    finally:
        second.shutdown()
