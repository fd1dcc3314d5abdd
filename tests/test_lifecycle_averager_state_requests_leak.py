"""An averager whose process asked the user's process for its state (a download of our state by a peer, or our own
load_state_from_peers) leaves nothing behind in the user's process once shut down: the connection to that process's
futures and the mapping of their shared memory (one descriptor each) were kept for as long as the user's process
lived, two descriptors more per averager."""

import os

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT

LOCALHOST = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"])


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(90)
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_averagers_that_asked_for_the_state_leave_no_descriptors_once_shut_down():
    with DHT(start=True, **LOCALHOST) as dht:

        def cycle(index: int) -> None:
            averager = DecentralizedAverager([torch.zeros(3)], dht, prefix=f"state_leak{index}", start=True)
            # nobody shares a state under this prefix; the averager's process first asks ours what a state looks like
            assert averager.load_state_from_peers(timeout=0.5) is None
            averager.shutdown()

        cycle(0)  # (first-use costs, e.g. this process's own futures' listener)
        before = _open_descriptors()
        for index in range(1, 6):
            cycle(index)
        assert _open_descriptors() <= before, f"{_open_descriptors() - before} more open file descriptors"
