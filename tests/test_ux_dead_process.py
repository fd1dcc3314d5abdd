"""After the DHT (or averager) process is killed, calls say that it exited, how (the signal), and what to do."""

import os
import signal

import psutil
import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.optim import Optimizer


@pytest.mark.timeout(30)
def test_call_to_killed_dht_names_signal_and_remedy():
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    daemons = psutil.Process(dht.pid).children(recursive=True)
    try:
        os.kill(dht.pid, signal.SIGKILL)
        dht.join(timeout=10)
        assert dht.exitcode == -signal.SIGKILL
        for _ in range(2):  # the first call may meet the closed pipe while sending, the second a known-closed channel
            with pytest.raises(RuntimeError) as error_info:
                dht.get("some_key", latest=True)
            message = str(error_info.value)
            assert "SIGKILL" in message and "create a new DHT" in message, message
    finally:
        for daemon in daemons:
            daemon.kill()
        psutil.wait_procs(daemons, timeout=5)


@pytest.mark.timeout(30)
def test_call_to_killed_averager_names_signal_and_remedy():
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
        averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="ux_dead", start=True, target_group_size=2)
        os.kill(averager.pid, signal.SIGKILL)
        averager.join(timeout=10)
        with pytest.raises(RuntimeError, match="killed by signal SIGKILL.*create a new averager"):
            averager.get_group_bits()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", ["averager", "optimizer"])
def test_averager_or_optimizer_on_a_shut_down_dht_says_so(make):
    # dht.client_mode is known (cached) from before the shutdown, so nothing asks the DHT process before the new
    # averager's process connects to it: that connection found the DHT's socket gone (a bare FileNotFoundError)
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    assert dht.client_mode is False
    dht.shutdown()
    # (the Optimizer's first part, its progress tracker since it is made first as in 1.1.12, names it its own way)
    with pytest.raises(RuntimeError, match="DHT process (is not running|has ended).*create a new DHT"):
        if make == "averager":
            DecentralizedAverager([torch.zeros(3)], dht, prefix="ux_dead_dht", start=True)
        else:
            model = torch.nn.Linear(3, 1)
            Optimizer(dht=dht, run_id="ux_dead_dht", target_batch_size=4, batch_size_per_step=1,
                      optimizer=torch.optim.SGD, params=model.parameters())  # fmt: skip
