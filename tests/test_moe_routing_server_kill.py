"""A real expert server process killed (SIGKILL) mid-training: its experts are masked and training goes on."""

import multiprocessing as mp

import psutil
import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts

HID = 16


def _serve(uids, initial_peers, connection):
    from hivemind.moe.server import Server

    torch.set_num_threads(1)  # a forked child must not start OpenMP threads after the parent used them (it can hang)
    server = Server.create(
        expert_uids=uids,
        expert_cls="ffn",
        hidden_dim=HID,
        initial_peers=initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    )
    connection.send([str(maddr) for maddr in server.dht.get_visible_maddrs()])
    try:
        connection.recv()  # until the test closes its end, or kills us
    except EOFError:
        pass
    finally:
        server.shutdown()


def kill_tree(pid: int) -> None:
    """SIGKILL a process with its descendants (its DHT process and p2pd daemon)."""
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def start_server_processes(*uid_groups):
    """Start one server process per group of uids (in parallel); returns [(process, pipe end, maddrs)]."""
    started = []
    for uids in uid_groups:
        parent_end, child_end = mp.Pipe()
        process = mp.get_context("fork").Process(target=_serve, args=(uids, [], child_end))
        process.start()
        started.append((process, parent_end))
    servers = []
    for process, parent_end in started:
        if not parent_end.poll(60):
            for other, _ in started:
                kill_tree(other.pid)
            raise AssertionError("an expert server did not start within 60 s")
        servers.append((process, parent_end, parent_end.recv()))
    return servers


@pytest.mark.timeout(120)
def test_training_continues_when_a_server_process_is_killed():
    (first, first_end, first_maddrs), (second, second_end, second_maddrs) = start_server_processes(
        ["ffn.0.0", "ffn.0.1"], ["ffn.1.0", "ffn.1.1"]
    )
    client_dht = DHT(start=True, initial_peers=first_maddrs + second_maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(
            in_features=HID,
            grid_size=(2, 2),
            dht=client_dht,
            uid_prefix="ffn.",
            k_best=4,
            forward_timeout=10,
            backward_timeout=10,
        )
        optimizer = torch.optim.SGD(moe.parameters(), lr=0.05)
        torch.manual_seed(0)
        x, target = torch.randn(16, HID), torch.randn(16, HID)
        for step in range(6):
            if step == 2:  # the whole server goes away at once, as when its machine fails
                kill_tree(second.pid)
                second.join(10)
            loss = (moe(x) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in moe.parameters())
        assert moe.failure_penalty.is_penalized("ffn.1.0") and moe.failure_penalty.is_penalized("ffn.1.1")
        assert not moe.failure_penalty.is_penalized("ffn.0.0")
    finally:
        client_dht.shutdown()
        for process, end in ((first, first_end), (second, second_end)):
            end.close()
            if process.is_alive():
                kill_tree(process.pid)
            process.join(10)
