"""The p2pd daemon of a newcomer's DHT is killed: load_state_from_peers returns None at once (as 1.1.12 does) and says
once that this peer's daemon stopped and what to do, instead of a warning per donor blaming each of them."""

import time

import psutil
import pytest
import torch

import hivemind


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
