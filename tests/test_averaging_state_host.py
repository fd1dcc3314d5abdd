"""A donor's get_current_state, which runs in the user's process, as users write it: without infos, or slow enough
that the averager shuts down before it returns (what it hands over must not stay behind in the user's process)."""

import time

import pytest
import torch
from averager_helpers import FAST, dht_swarm

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.dht import DHT


def _wait_for_donor(dht: DHT, prefix: str, donor: DecentralizedAverager, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = dht.get(f"{prefix}.all_averagers", latest=True)
        if result is not None and donor.peer_id.to_bytes() in result.value:
            return
        time.sleep(0.1)
    raise AssertionError(f"{donor.peer_id} never declared itself a donor under {prefix}")


class StateWithoutInfos(DecentralizedAverager):
    """get_current_state may return (metadata, tensors), leaving the infos out."""

    def get_current_state(self):
        metadata, tensors, _ = super().get_current_state()
        return metadata, tensors


@pytest.mark.timeout(120)
def test_state_returned_without_infos_is_served():
    state = [torch.randn(1000), torch.arange(5)]
    with dht_swarm(2) as dhts:
        averagers = [
            StateWithoutInfos(tensors, dht, prefix="state_no_infos", start=True, allow_state_sharing=share, **FAST)
            for tensors, dht, share in [
                (state, dhts[0], True),
                ([torch.zeros(1000), torch.zeros(5).long()], dhts[1], False),
            ]
        ]
        try:
            _wait_for_donor(dhts[1], "state_no_infos", averagers[0])
            result = averagers[1].load_state_from_peers(timeout=30)
            assert result is not None, "the donor refused its state"
            metadata, tensors = result
            assert metadata == {"group_key": ""}
            assert all(torch.equal(got, sent) for got, sent in zip(tensors, state))
        finally:
            for averager in averagers:
                averager.shutdown()
