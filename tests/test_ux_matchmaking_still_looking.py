"""An averaging step without a timeout that finds nobody says so in the log while it waits, instead of nothing."""

import logging
import time

import pytest
import torch

import hivemind.averaging.matchmaking as matchmaking
from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT


@pytest.mark.timeout(60)
def test_lone_step_without_timeout_logs_that_it_is_still_looking(monkeypatch, tmp_path):
    monkeypatch.setattr(matchmaking, "STILL_LOOKING_AFTER", 1.0)  # (15 s by default; the averager's process is
    monkeypatch.setattr(matchmaking, "STILL_LOOKING_PERIOD", 2.0)  # forked after this, with these values and handler)
    log_file = tmp_path / "matchmaking.log"
    handler = logging.FileHandler(log_file)
    matchmaking.logger.addHandler(handler)
    try:
        run_a_lone_step()
    finally:
        matchmaking.logger.removeHandler(handler)
        handler.close()
    lines = [line for line in log_file.read_text().splitlines() if "Still looking for a group" in line]
    assert 1 <= len(lines) <= 3, lines  # at ~1 s, ~3 s (~5 s on a slow machine), not at every poll
    assert "no other averagers were found under the key ux_lone.0b" in lines[0], lines


def run_a_lone_step() -> None:
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
        averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="ux_lone", start=True, target_group_size=2)
        try:
            control = averager.step(wait=False)  # no timeout: it searches until someone comes
            time.sleep(4.0)
            assert not control.done()
            control.cancel()
        finally:
            averager.shutdown()
