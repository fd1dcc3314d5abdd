"""RemoteMixtureOfExperts of either implementation over a swarm that mixes experts served by the original
1.1.12 (expert.0) and by ours (expert.1), both declared under prefix "expert.": beam search finds both, and a batch
above the 2 MiB unary limit (streamed both ways) gives the output and input gradient of the same mixture run locally.
"""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from .conftest import ORIGINAL, OURS
from .moe_process import MoEPeer, start_server

pytestmark = [pytest.mark.interop]

SCRIPT = Path(__file__).resolve().with_name("moe_mixture_peer.py")
HIDDEN = 1024  # a wide input keeps the batch small: the original's beam search takes ~10 ms per sample
BATCH = 2 * 1024**2 // (4 * HIDDEN) + 7  # above the 2 MiB unary limit: requests and responses are streamed


@pytest.fixture(scope="module")
def mixed_servers(original_env, interop_log_dir, tmp_path_factory):
    """expert.0 served by the original, expert.1 by ours (joined to the original's DHT): (maddrs, state paths)."""
    folder = tmp_path_factory.mktemp("moe-mixed-servers")
    states = [folder / "expert0.pt", folder / "expert1.pt"]
    servers = []
    try:
        original, maddrs = start_server(
            SCRIPT, ORIGINAL, ["serve", "expert.0", 0, states[0], HIDDEN], interop_log_dir, original_attempts=6
        )  # within the first test's 240 s
        servers.append(original)
        ours, our_maddrs = start_server(
            SCRIPT, OURS, ["serve", "expert.1", 1, states[1], HIDDEN, *maddrs], interop_log_dir
        )
        servers.append(ours)
        yield maddrs + our_maddrs, states
    finally:
        for server in servers:
            server.close()


def local_mixture(experts, proj: nn.Linear, inputs: torch.Tensor):
    """What the mixture computes when every sample goes to every expert: softmax of the gating logits as weights."""
    inputs = inputs.detach().clone().requires_grad_(True)
    weights = torch.softmax(proj(inputs), dim=-1)
    output = sum(weights[:, i : i + 1] * expert(inputs) for i, expert in enumerate(experts))
    (output * output).sum().backward()
    return output.detach(), inputs.grad


@pytest.mark.timeout(240)
@pytest.mark.parametrize("client_side", [OURS, ORIGINAL])
def test_mixture_of_experts_over_original_and_our_servers(mixed_servers, interop_log_dir, tmp_path, client_side):
    maddrs, states = mixed_servers
    torch.manual_seed(2)
    inputs, proj = torch.randn(BATCH, HIDDEN), nn.Linear(HIDDEN, 2)
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(proj.state_dict(), tmp_path / "proj.pt")
    args = ["mix", tmp_path / "result.pt", tmp_path / "inputs.pt", tmp_path / "proj.pt", 2, *maddrs]
    client = MoEPeer(SCRIPT, client_side, args, interop_log_dir)
    try:
        assert client.event("done", timeout=150)["found"] == ["expert.0", "expert.1"]
    finally:
        client.close()
    remote = torch.load(tmp_path / "result.pt")

    experts = []
    for state in states:
        expert = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.Tanh(), nn.Linear(2 * HIDDEN, HIDDEN))
        expert.load_state_dict(torch.load(state))
        experts.append(expert)
    expected_output, expected_grad = local_mixture(experts, proj, inputs)
    assert remote["output"].shape == expected_output.shape and remote["grad"].shape == expected_grad.shape
    torch.testing.assert_close(remote["output"], expected_output, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(remote["grad"], expected_grad, atol=1e-3, rtol=1e-3)
