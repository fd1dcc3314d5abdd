"""A lone averaging step says what it waits for (no timeout), and ends its search at a deadline cleanly."""

import time

import pytest
import torch

import hivemind.averaging.matchmaking as matchmaking
from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from tests.log_file import debug_level, logged_to_file


@pytest.mark.timeout(60)
def test_lone_step_without_timeout_logs_that_it_is_still_looking(monkeypatch, tmp_path):
    monkeypatch.setattr(matchmaking, "STILL_LOOKING_AFTER", 1.0)  # (15 s by default; the averager's process is
    monkeypatch.setattr(matchmaking, "STILL_LOOKING_PERIOD", 2.0)  # forked after this, with these values and handler)
    log_file = tmp_path / "matchmaking.log"
    with logged_to_file(matchmaking.logger, log_file):
        run_a_lone_step()
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


@pytest.mark.timeout(60)
def test_a_search_that_ends_at_its_deadline_withdraws_nothing_that_expired(tmp_path):
    # at the deadline the declaration had just expired (its expiration cleared): the withdrawal then failed with
    # TypeError("float() argument must be ... not 'NoneType'"), logged at DEBUG at the end of every such search
    log_file = tmp_path / "matchmaking.log"
    with (
        debug_level(matchmaking.logger),
        logged_to_file(matchmaking.logger, log_file),
        DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht,
    ):
        options = dict(prefix="ux_lone_deadline", target_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5)
        with DecentralizedAverager([torch.zeros(3)], dht, start=True, **options) as averager:
            with pytest.raises(Exception, match="could not find a group"):
                averager.step(timeout=2.5)
    text = log_file.read_text()
    assert "looks for a group under ux_lone_deadline" in text  # (the DEBUG lines were written)
    assert "failed to withdraw" not in text, text
