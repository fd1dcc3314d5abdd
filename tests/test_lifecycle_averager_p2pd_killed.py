"""The p2pd daemon of a running averager's DHT is killed: the next averaging step fails at once and says so, instead
of retrying until its timeout and blaming the other peers ("no other averagers were found")."""

import time

import psutil
import pytest
import torch

import hivemind
from hivemind.averaging.partition import AllreduceException


@pytest.mark.timeout(60)
def test_step_fails_at_once_naming_the_dead_daemon():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    averager = hivemind.DecentralizedAverager(
        [torch.zeros(3)], dht, prefix="killed_daemon", start=True, target_group_size=2, min_matchmaking_time=1
    )
    try:
        (daemon,) = [child for child in psutil.Process(dht.pid).children() if child.name() == "p2pd"]
        daemon.kill()
        daemon.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(AllreduceException, match="p2pd daemon of this peer's DHT stopped"):
            averager.step(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        averager.shutdown()
        dht.shutdown()
