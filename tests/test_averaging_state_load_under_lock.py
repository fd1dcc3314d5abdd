"""``load_state_from_peers()`` works while the caller holds ``get_tensors()`` (to copy the downloaded state into its
tensors in one go), as in hivemind 1.1: the newcomer's own state is only described by shapes and dtypes, which does
not need the tensors' lock."""

import time

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm


@pytest.mark.timeout(60)
def test_load_state_from_peers_while_holding_the_tensors():
    tensors = [[torch.arange(6, dtype=torch.float32)], [torch.zeros(6)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, allow_state_sharing=[True, False]) as (donor, newcomer):
        donor.state_sharing_priority = 1.0
        deadline = time.monotonic() + 30
        with newcomer.get_tensors() as local:
            while True:  # the donor's declaration reaches the DHT in the background
                started = time.monotonic()
                state = newcomer.load_state_from_peers(timeout=10)
                assert time.monotonic() - started < 9, "load_state_from_peers waited for the lock held here"
                if state is not None or time.monotonic() > deadline:
                    break
            assert state is not None
            local[0].copy_(state[1][0])
        with newcomer.get_tensors() as local:
            assert torch.equal(local[0], torch.arange(6, dtype=torch.float32))
