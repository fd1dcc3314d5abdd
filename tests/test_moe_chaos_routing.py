"""Churn: once a mixture knows that a server's experts fail, its samples are routed to the next-best alive experts
instead of to the failed ones (which used to take their slots until the announcements expired, leaving the samples
of those experts with no answer: a RuntimeError at every step without allow_zero_outputs)."""

import contextlib
import time

import pytest
import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts, Server
from hivemind.moe.client.gating import ExpertFailurePenalty
from hivemind.moe.server.dht_handler import get_experts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4


def start_server(uids, initial_peers):
    backends = {
        uid: ModuleBackend(uid, nn.Linear(HID, HID), args_schema=(BatchTensorDescriptor(HID),), max_batch_size=64)
        for uid in uids
    }
    dht = DHT(start=True, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    return Server(dht, backends, start=True)


@contextlib.contextmanager
def two_servers():
    """(first server, client DHT); the first server hosts row 0 of a 2x2 grid, a second one row 1."""
    first = start_server(["ffn.0.0", "ffn.0.1"], [])
    peers = [str(maddr) for maddr in first.dht.get_visible_maddrs()]
    second = start_server(["ffn.1.0", "ffn.1.1"], peers)
    client_dht = DHT(start=True, initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        deadline = time.monotonic() + 20
        while None in get_experts(client_dht, ["ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1"]):
            assert time.monotonic() < deadline, "the servers did not announce their experts"
            time.sleep(0.1)
        yield first, client_dht
    finally:
        client_dht.shutdown()
        second.shutdown()
        first.shutdown()


def prefer_first_row(moe: RemoteMixtureOfExperts, margin: float = 10.0) -> None:
    with torch.no_grad():  # every sample prefers the first server's experts (row 0 of the grid)
        moe.proj.weight.zero_()
        moe.proj.bias.copy_(torch.tensor([margin, 0.0, 0.0, 0.0]))


@pytest.mark.timeout(60)
def test_samples_of_a_failed_server_go_to_the_next_best_experts_at_the_following_step():
    torch.manual_seed(0)
    with two_servers() as (first, client_dht):
        moe = RemoteMixtureOfExperts(
            dht=client_dht, uid_prefix="ffn.", grid_size=(2, 2), in_features=HID, k_best=2, forward_timeout=10
        )
        prefer_first_row(moe)
        x = torch.randn(8, HID)
        assert moe(x).shape == (8, HID)

        first.shutdown()  # its announcements stay in the DHT until they expire
        with pytest.raises((RuntimeError, TimeoutError)):  # this step learns that its experts fail
            moe(x)
        assert moe.failure_penalty.is_penalized("ffn.0.0") and moe.failure_penalty.is_penalized("ffn.0.1")

        output = moe(x)  # the samples now go to the second server's experts
        assert output.shape == (8, HID) and torch.isfinite(output).all()
        assert output.abs().sum() > 0  # not the zeros of a sample without answers


@pytest.mark.timeout(60)
def test_switch_skips_every_expert_of_a_server_that_could_not_be_reached():
    torch.manual_seed(0)
    with two_servers() as (first, client_dht):
        switch = RemoteSwitchMixtureOfExperts(
            dht=client_dht, uid_prefix="ffn.", grid_size=(2, 2), in_features=HID, forward_timeout=10
        ).eval()  # k_best=1, allow_zero_outputs=True
        prefer_first_row(switch, margin=1.0)  # a switch weighs an expert by its gating probability: not too small
        x = torch.randn(8, HID)
        assert not torch.allclose(switch(x)[0], x)  # one expert of the first server answers every sample
        first.shutdown()
        output, _ = switch(x)  # that expert cannot be reached: the input alone comes back
        assert torch.equal(output, x)

        # the server's other expert is not tried (it would fail the same way): an expert of row 1 answers
        output, _ = switch(x)
        assert torch.isfinite(output).all() and not torch.allclose(output, x)


def test_unreachable_server_penalizes_all_its_experts_and_an_answered_error_only_that_expert():
    penalty = ExpertFailurePenalty()
    penalty.report_failure(("ffn.0.0", "server-a"), server_down=True)  # timed out or could not be reached
    assert penalty.is_penalized(("ffn.0.1", "server-a")) and not penalty.is_penalized(("ffn.0.1", "server-b"))
    penalty.report_failure(("ffn.1.0", "server-b"))  # e.g. a malformed answer: the server itself is alive
    assert penalty.is_penalized(("ffn.1.0", "server-b")) and not penalty.is_penalized(("ffn.1.1", "server-b"))
    penalty.report_success(("ffn.0.0", "server-a"))  # tried again once the penalty ended, and it answered
    assert not penalty.is_penalized(("ffn.0.1", "server-a"))
