"""RemoteMixtureOfExperts and RemoteSwitchMixtureOfExperts routing, masking and time limits, over real daemons."""

import asyncio
import time

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts

HID = 8
GRID = (2, 3)
UIDS = [f"ffn.{i}.{j}" for i in range(GRID[0]) for j in range(GRID[1])]


def make_experts(uids):
    torch.manual_seed(1)
    return {uid: nn.Sequential(nn.Linear(HID, HID), nn.Tanh()) for uid in uids}


@pytest.fixture(scope="module")
def shared_swarm():
    server = FakeExpertServer(make_experts(UIDS), HID)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield server, client_dht
    finally:
        client_dht.shutdown()
        server.stop()


@pytest.fixture
def swarm(shared_swarm):
    """An expert server hosting UIDS (no faults) and a client DHT; shared by the tests of this module."""
    server, _ = shared_swarm
    modules = dict(server.handler.modules)
    server.handler.reset_faults()
    yield shared_swarm
    server.handler.modules = modules
    server.handler.reset_faults()


def local_mixture(moe, modules, x, k_best, excluded=()):
    """What the mixture should compute: softmax over the k best alive experts' summed logits."""
    scores = moe.proj(x).split_with_sizes(moe.grid_size, dim=-1)
    rows = []
    for row in range(len(x)):
        candidates = sorted(
            ((scores[0][row, i] + scores[1][row, j], f"ffn.{i}.{j}") for i in range(GRID[0]) for j in range(GRID[1])),
            key=lambda item: -item[0].item(),
        )[:k_best]
        alive = [(score, uid) for score, uid in candidates if uid not in excluded]
        weights = torch.softmax(torch.stack([score for score, _ in alive]), dim=0)
        rows.append(sum(w * modules[uid](x[row : row + 1])[0] for w, (_, uid) in zip(weights, alive)))
    return torch.stack(rows)


def test_forward_and_backward_match_a_local_mixture(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=3)
    x = torch.randn(5, HID, requires_grad=True)
    x_local = x.detach().clone().requires_grad_(True)

    output = moe(x)
    output.pow(2).sum().backward()
    proj_grad = moe.proj.weight.grad.clone()
    moe.proj.weight.grad = None
    expected = local_mixture(moe, server.handler.modules, x_local, k_best=3)
    expected.pow(2).sum().backward()

    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(x.grad, x_local.grad, atol=1e-5)
    assert torch.allclose(proj_grad, moe.proj.weight.grad, atol=1e-5)


def test_each_expert_gets_one_call_with_all_its_samples(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=6)
    moe(torch.randn(7, HID))
    assert {uid: server.handler.calls[f"forward:{uid}"] for uid in UIDS} == {uid: [7] for uid in UIDS}


def test_failed_expert_is_masked_from_the_mixture(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=6)
    server.handler.failing.add("ffn.1.2")
    x = torch.randn(4, HID)
    output = moe(x)
    expected = local_mixture(moe, server.handler.modules, x, k_best=6, excluded={"ffn.1.2"})
    assert torch.allclose(output, expected, atol=1e-5)


def test_nan_outputs_are_masked_with_detect_anomalies(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(
        in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=6, detect_anomalies=True
    )
    server.handler.nan_outputs.add("ffn.0.0")
    x = torch.randn(3, HID)
    expected = local_mixture(moe, server.handler.modules, x, k_best=6, excluded={"ffn.0.0"})
    assert torch.allclose(moe(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        moe(torch.full((3, HID), float("nan")))


def _routed_moe(client_dht, **kwargs):
    """A 1-D mixture of experts ffn.0.0 / ffn.0.1 where the sign of x[:, 0] picks the expert (k_best=1)."""
    moe = RemoteMixtureOfExperts(
        in_features=HID, grid_size=(1, 2), dht=client_dht, uid_prefix="ffn.", k_best=1, **kwargs
    )
    with torch.no_grad():
        moe.proj.weight.zero_(), moe.proj.bias.zero_()
        moe.proj.weight[1, 0], moe.proj.weight[2, 0] = 10.0, -10.0
    return moe


def test_samples_whose_experts_all_failed_get_zeros_and_finite_gradients(swarm):
    server, client_dht = swarm
    moe = _routed_moe(client_dht, allow_zero_outputs=True)
    server.handler.failing.add("ffn.0.0")
    x = torch.randn(6, HID)
    x[:3, 0], x[3:, 0] = 1.0, -1.0  # the first three samples go to the failing expert
    x.requires_grad_(True)
    output = moe(x)
    output.sum().backward()
    assert torch.equal(output[:3], torch.zeros(3, HID))
    assert torch.allclose(output[3:], server.handler.modules["ffn.0.1"](x[3:]), atol=1e-5)
    assert torch.isfinite(x.grad).all() and torch.isfinite(moe.proj.weight.grad).all()
    assert torch.equal(x.grad[:3], torch.zeros(3, HID))


def test_samples_whose_experts_all_failed_raise_without_allow_zero_outputs(swarm):
    server, client_dht = swarm
    moe = _routed_moe(client_dht)
    server.handler.failing.add("ffn.0.0")
    x = torch.randn(4, HID)
    x[:2, 0], x[2:, 0] = 1.0, -1.0
    with pytest.raises(RuntimeError, match="No expert answered for 2 of 4 samples"):
        moe(x)


def test_fewer_answers_than_k_min_raise_timeout_error(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=2)
    server.handler.failing.update(UIDS)
    with pytest.raises(TimeoutError, match="k_min=1"):
        moe(torch.randn(2, HID))


def test_fewer_backward_answers_than_backward_k_min_raise_timeout_error(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=2)
    output = moe(torch.randn(2, HID, requires_grad=True))
    server.handler.failing.update(UIDS)
    with pytest.raises(TimeoutError, match="backward_k_min=1"):
        output.sum().backward()


@pytest.mark.timeout(30)
def test_stragglers_are_dropped_after_timeout_after_k_min(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(
        in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=6, timeout_after_k_min=0.5
    )
    moe(torch.randn(2, HID))  # fetches the expert info
    server.handler.delays["ffn.1.1"] = 20
    x = torch.randn(3, HID)
    started = time.monotonic()
    output = moe(x)
    assert time.monotonic() - started < 5
    expected = local_mixture(moe, server.handler.modules, x, k_best=6, excluded={"ffn.1.1"})
    assert torch.allclose(output, expected, atol=1e-5)
    assert not moe.failure_penalty.is_penalized("ffn.1.1")  # slow but alive: not a failure


@pytest.mark.timeout(40)
def test_expert_that_timed_out_is_not_waited_for_at_the_next_step(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(
        in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=6, forward_timeout=3
    )
    moe(torch.randn(2, HID))
    server.handler.delays["ffn.0.1"] = 30
    started = time.monotonic()
    moe(torch.randn(2, HID))
    first_step = time.monotonic() - started
    started = time.monotonic()
    moe(torch.randn(2, HID))
    second_step = time.monotonic() - started
    # without the penalty, the second step would wait for the slow expert until its deadline again
    assert first_step >= 2.9 and second_step < 2.5
    assert len(server.handler.calls["forward:ffn.0.1"]) == 2  # the info step and the step that timed out


class SlowDHT(DHT):
    """A DHT whose every search takes 20 s longer."""

    async def _run_coroutine(self, coro):
        await asyncio.sleep(20)
        return await super()._run_coroutine(coro)


@pytest.mark.timeout(30)
def test_forward_timeout_bounds_the_beam_search_on_a_slow_dht(swarm):
    server, _ = swarm
    slow_dht = SlowDHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(
            in_features=HID, grid_size=GRID, dht=slow_dht, uid_prefix="ffn.", k_best=2, forward_timeout=1
        )
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="forward_timeout"):
            moe(torch.randn(2, HID))
        assert time.monotonic() - started < 5  # far from the 20 s the search takes
    finally:
        slow_dht.shutdown()


@pytest.mark.timeout(60)
def test_training_continues_when_a_server_is_killed(swarm):
    server, client_dht = swarm
    second = FakeExpertServer(make_experts(["ffn.1.0", "ffn.1.1", "ffn.1.2"]), HID, server.dht.get_visible_maddrs())
    server.handler.modules = {uid: module for uid, module in server.handler.modules.items() if uid.startswith("ffn.0")}
    try:
        moe = RemoteMixtureOfExperts(
            in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=6, forward_timeout=5
        )
        optimizer = torch.optim.SGD(moe.parameters(), lr=0.1)
        x, target = torch.randn(8, HID), torch.randn(8, HID)
        for step in range(6):
            if step == 2:
                second.stop()
            loss = (moe(x) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in moe.parameters())
        assert all(moe.failure_penalty.is_penalized(uid) for uid in ["ffn.1.0", "ffn.1.1", "ffn.1.2"])
    finally:
        second.stop()
        server.declare(
            expiration=600, uids=UIDS
        )  # outlives the dead server's announcements: later tests use these experts


def test_switch_mixture_returns_output_with_residual_and_balancing_loss(swarm):
    server, client_dht = swarm
    moe = RemoteSwitchMixtureOfExperts(
        in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", jitter_eps=0
    )
    x = torch.randn(4, HID, requires_grad=True)
    output, loss = moe(x)
    scores = moe.proj(x).split_with_sizes(GRID, dim=-1)
    probs = [torch.softmax(s, dim=-1) for s in scores]
    for row in range(4):
        i, j = int(scores[0][row].argmax()), int(scores[1][row].argmax())
        expected = probs[0][row, i] * probs[1][row, j] * server.handler.modules[f"ffn.{i}.{j}"](x[row]) + x[row]
        assert torch.allclose(output[row], expected, atol=1e-5)
    assert loss.ndim == 0 and torch.isfinite(loss)
    (output.sum() + loss).backward()
    assert torch.isfinite(moe.proj.weight.grad).all()
    assert torch.allclose(moe.grid_utilization.split(list(GRID))[0].sum(), torch.tensor(1.0))


def test_info_comes_from_an_alive_expert_before_any_forward(swarm):
    _, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn", k_best=2)
    assert moe.info["outputs_schema"].shape == (None, HID) and moe.info["keyword_names"] == ()


def test_no_alive_expert_in_the_grid_raises_runtime_error(swarm):
    _, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(4,), dht=client_dht, uid_prefix="absent.", k_best=2)
    with pytest.raises(RuntimeError, match="No responding experts found"):
        moe(torch.randn(2, HID))
