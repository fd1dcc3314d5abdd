"""The p2pd daemon of a newcomer's DHT is killed: load_state_from_peers returns None at once (as 1.1.12 does) and says
once that this peer's daemon stopped and what to do, instead of a warning per donor blaming each of them."""

import threading
import time

import psutil
import pytest
import torch

import hivemind
from hivemind.averaging.state_snapshot import is_describing_state


@pytest.mark.timeout(90)
def test_load_state_names_the_dead_daemon_once(capfd):
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())]
    dhts.append(
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
    )
    options = dict(prefix="dead_newcomer", start=True)
    donors = [
        hivemind.DecentralizedAverager([torch.ones(3)], dht, declare_state_period=1.0, **options)
        for dht in (first, dhts[0])
    ]
    newcomer = hivemind.DecentralizedAverager(
        [torch.zeros(3)], dhts[1], start_method="spawn", **options
    )  # logs to fd 2
    try:
        deadline = time.monotonic() + 30
        while len(getattr(dhts[1].get("dead_newcomer.all_averagers", latest=True), "value", ())) < 2:
            assert time.monotonic() < deadline, "the donors' declarations never showed"
            time.sleep(0.2)
        (daemon,) = [child for child in psutil.Process(dhts[1].pid).children() if child.name() == "p2pd"]
        daemon.kill()
        daemon.wait(timeout=10)
        capfd.readouterr()
        started = time.monotonic()
        assert newcomer.load_state_from_peers(timeout=10) is None
        assert time.monotonic() - started < 5
        time.sleep(0.5)  # (the averager's process writes its log lines to the same stderr)
        err = capfd.readouterr().err
        assert err.count("the p2pd daemon of this peer's DHT stopped") == 1, err
        assert "create new ones" in err
        assert "trying the next donor" not in err and "Could not download a state from any" not in err, err
    finally:
        newcomer.shutdown()
        for donor in donors:
            donor.shutdown()
        for dht in reversed([first, *dhts]):
            dht.shutdown()


class _HeldDonor(hivemind.DecentralizedAverager):
    """Once ``armed``, the next snapshot of its state (for a download) waits until ``release`` is set, having set
    ``entered``: the newcomer's download is then under way. The same class on every side (its name is in the
    handler's)."""

    armed = False

    def get_current_state(self):
        if self.armed and not is_describing_state():
            self.armed = False
            self.entered.set()
            self.release.wait(30)
        return super().get_current_state()


@pytest.mark.timeout(90)
def test_a_daemon_that_dies_during_the_download_is_named_once(capfd):
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
    options = dict(prefix="dying_newcomer", start=True)
    donor = _HeldDonor([torch.ones(3)], first, declare_state_period=1.0, **options)
    donor.entered, donor.release = threading.Event(), threading.Event()
    newcomer = _HeldDonor([torch.zeros(3)], second, start_method="spawn", **options)  # logs to fd 2
    try:
        deadline = time.monotonic() + 30
        while second.get("dying_newcomer.all_averagers", latest=True) is None:
            assert time.monotonic() < deadline, "the donor's declaration never showed"
            time.sleep(0.2)
        capfd.readouterr()
        donor.armed = True
        future = newcomer.load_state_from_peers(wait=False, timeout=30)
        assert donor.entered.wait(30), "the donor was never asked for its state"
        (daemon,) = [child for child in psutil.Process(second.pid).children() if child.name() == "p2pd"]
        daemon.kill()
        daemon.wait(timeout=10)
        donor.release.set()
        assert future.result(timeout=30) is None
        time.sleep(0.5)  # (the averager's process writes its log lines to the same stderr)
        err = capfd.readouterr().err
        assert err.count("the p2pd daemon of this peer's DHT stopped") == 1, err
        assert "trying the next donor" not in err and "Could not download a state from any" not in err, err
    finally:
        donor.release.set()
        newcomer.shutdown()
        donor.shutdown()
        second.shutdown()
        first.shutdown()
