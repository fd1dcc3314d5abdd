"""Mixture-of-experts interop: our RemoteExpert calls an expert served by the original 1.1.12, and the original's
RemoteExpert calls an expert served by ours. Results must equal the same module run locally, for the unary and the
streaming RPCs, with and without compression."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from .conftest import ORIGINAL, OURS
from .moe_process import MoEPeer, start_server

SCRIPT = Path(__file__).resolve().with_name("moe_peer.py")
HIDDEN = 64
UNARY_BATCH, STREAMING_BATCH = 5, 2 * 1024**2 // (4 * HIDDEN) + 7  # the latter is above the 2 MiB unary limit
CASES = [(UNARY_BATCH, 0), (STREAMING_BATCH, 0), (UNARY_BATCH, 2)]  # (batch size, CompressionType: NONE, FLOAT16)
CASE_IDS = ["unary", "streaming", "unary-float16"]


def make_module(state_dict=None) -> nn.Module:
    module = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.Tanh(), nn.Linear(2 * HIDDEN, HIDDEN))
    if state_dict is not None:
        module.load_state_dict(state_dict)
    return module


def local_results(module: nn.Module, inputs: torch.Tensor):
    """The reference results, with one intra-op thread as the peers compute them (see moe_peer.py: a batch split
    between two threads is the likely cause of one failure where the second half of the rows was 5e-5 off)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = inputs.detach().clone().requires_grad_(True)
        output = module(inputs)
        (output * output).sum().backward()
        return output.detach(), inputs.grad
    finally:
        torch.set_num_threads(threads)


def assert_close(remote_output, remote_grad, expected_output, expected_grad, compression: int):
    tolerance = 1e-5 if compression == 0 else 2e-2
    assert remote_output.shape == expected_output.shape and remote_grad.shape == expected_grad.shape
    for what, remote, expected, scale in [
        ("output", remote_output, expected_output, 1),
        ("input gradient", remote_grad, expected_grad, 10),
    ]:
        close = torch.isclose(remote, expected, atol=tolerance * scale, rtol=tolerance * scale)
        bad_rows = (~close).any(dim=-1).nonzero().flatten().tolist()
        assert not bad_rows, (
            f"{what}: {len(bad_rows)} of {len(remote)} rows differ (first {bad_rows[:8]}), largest difference "
            f"{(remote - expected).abs().max().item():.3g}"
        )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("batch_size, compression", CASES, ids=CASE_IDS)
def test_our_remote_expert_calls_an_original_server(original_env, interop_log_dir, tmp_path, batch_size, compression):
    from hivemind.dht import DHT
    from hivemind.moe import get_experts
    from hivemind.moe.client.beam_search import MoEBeamSearcher

    server, maddrs = start_server(
        SCRIPT, ORIGINAL, ["serve", tmp_path / "state.pt", HIDDEN, compression], interop_log_dir
    )
    try:
        with DHT(start=True, initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
            (expert,) = get_experts(dht, ["expert.0"])
            assert expert is not None
            torch.manual_seed(1)
            inputs = torch.randn(batch_size, HIDDEN, requires_grad=True)
            output = expert(inputs)
            (output * output).sum().backward()
            expected_output, expected_grad = local_results(make_module(torch.load(tmp_path / "state.pt")), inputs)
            searcher = MoEBeamSearcher(dht, "expert.", (4,))
            assert [remote.uid for remote in searcher.find_best_experts([[0.0, 1.0, 2.0, 3.0]], 2)] == ["expert.0"]
            assert_close(output.detach(), inputs.grad, expected_output, expected_grad, compression)
    finally:
        server.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("batch_size, compression", CASES, ids=CASE_IDS)
def test_original_remote_expert_calls_our_server(original_env, interop_log_dir, tmp_path, batch_size, compression):
    server, maddrs = start_server(SCRIPT, OURS, ["serve", tmp_path / "state.pt", HIDDEN, compression], interop_log_dir)
    try:
        torch.manual_seed(1)
        inputs = torch.randn(batch_size, HIDDEN)
        torch.save(inputs, tmp_path / "inputs.pt")
        client = MoEPeer(
            SCRIPT, ORIGINAL, ["call", tmp_path / "result.pt", tmp_path / "inputs.pt", *maddrs], interop_log_dir
        )
        try:
            assert client.event("done", timeout=120)["found_by_beam_search"] == ["expert.0"]
        finally:
            client.close()
    finally:
        server.close()
    remote = torch.load(tmp_path / "result.pt")
    expected_output, expected_grad = local_results(make_module(torch.load(tmp_path / "state.pt")), inputs)
    assert_close(remote["output"], remote["grad"], expected_output, expected_grad, compression)
