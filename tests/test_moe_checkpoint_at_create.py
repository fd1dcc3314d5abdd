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


@pytest.mark.timeout(90)
def test_a_restart_finds_its_experts_when_the_directory_holds_saves_named_later_than_now(tmp_path):
    """Saves named after a later time (written on a machine whose clock ran ahead, or before this clock was set back)
    outnumber the keep limit: the save made at creation is still kept, and checkpoint_last.pt still leads to it."""
    options = dict(expert_uids=["ffn.0"], hidden_dim=8, checkpoint_dir=tmp_path, update_period=3600)
    first = Server.create(start=False, **options, **LOOPBACK)
    first.shutdown()
    directory = tmp_path / "ffn.0"
    (saved,) = [path for path in directory.glob("checkpoint_2*.pt")]
    for year in (2998, 2999, 3000):  # copies named after a later time; checkpoint_last.pt points to the newest
        (directory / f"checkpoint_{year}-01-01T00:00:00.000000.pt").write_bytes(saved.read_bytes())
    (directory / "checkpoint_last.pt").unlink()
    (directory / "checkpoint_last.pt").symlink_to("checkpoint_3000-01-01T00:00:00.000000.pt")

    second = Server.create(start=False, **options, **LOOPBACK)  # loads the newest, saves it at once
    try:
        parameters = parameters_of(second)
    finally:
        second.shutdown()
    assert (directory / "checkpoint_last.pt").exists(), "checkpoint_last.pt points to a save that was pruned"
    third = Server.create(start=False, **options, **LOOPBACK)  # a restart before the first period
    try:
        assert all(torch.equal(a, b) for a, b in zip(parameters_of(third)["ffn.0"], parameters["ffn.0"]))
    finally:
        third.shutdown()
