"""Our RemoteMixtureOfExperts calling an expert served by the original 1.1.12 with more rows than its max_batch_size:
1.1.12 refuses them with ValueError("Task size greater than max_batch_size (N), it can't be processed") in a unary
call and with that bare text in a streamed one (above 2 MiB). Either is the caller's bad request, not the expert's
failure: the mixture raises the refusal's reason, as it does for a server of ours."""

from pathlib import Path

import pytest
import torch

import hivemind
from hivemind.moe import RemoteMixtureOfExperts

from .conftest import ORIGINAL
from .moe_process import start_server

pytestmark = [pytest.mark.interop]

SCRIPT = Path(__file__).resolve().with_name("moe_mixture_peer.py")
HIDDEN = 1024
MAX_BATCH_SIZE = 16


@pytest.fixture(scope="module")
def original_server(original_env, interop_log_dir, tmp_path_factory):
    """expert.0 served by the original with max_batch_size 16: its maddrs."""
    state = tmp_path_factory.mktemp("moe-original-refusals") / "expert0.pt"
    args = ["serve", "expert.0", 0, state, HIDDEN, "--max-batch-size", MAX_BATCH_SIZE]
    server, maddrs = start_server(SCRIPT, ORIGINAL, args, interop_log_dir, original_attempts=6)
    try:
        yield maddrs
    finally:
        server.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_rows", [20, 600])  # 20 rows go in a unary call, 600 (2.4 MiB) are streamed
def test_an_original_servers_refusal_of_too_many_rows_is_the_callers_fault(original_server, num_rows):
    dht = hivemind.DHT(start=True, initial_peers=original_server, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(
            dht=dht, uid_prefix="expert.", grid_size=(1,), in_features=HIDDEN, k_best=1,
            forward_timeout=30, backward_timeout=30, timeout_after_k_min=10,
        )  # fmt: skip
        with pytest.raises(ValueError, match=r"refused the request as invalid.*max_batch_size \(16\)"):
            moe(torch.randn(num_rows, HIDDEN))
    finally:
        dht.shutdown()
