"""The pace floor of an averager's state downloads comes from HIVEMIND_STATE_MIN_RATE when set: without it, a peer on
a link slower than the default floor (64 KiB/s) could never download or serve a state of more than a few MiB through
DecentralizedAverager or hivemind.Optimizer, which pass no floor of their own."""

import pytest
import torch
from averager_helpers import FAST, dht_swarm

from hivemind.averaging import averager_process
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.state_rate import DEFAULT_MIN_RATE, MIN_RATE_ENV, configured_min_rate
from hivemind.averaging.state_sharing import StateSharing


@pytest.mark.parametrize(
    "value, expected",
    [(None, DEFAULT_MIN_RATE), ("", DEFAULT_MIN_RATE), ("16384", 16384.0), ("0", None), (" None ", None)],
)
def test_the_floor_is_the_default_unless_the_environment_sets_it(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(MIN_RATE_ENV, raising=False)
    else:
        monkeypatch.setenv(MIN_RATE_ENV, value)
    assert configured_min_rate() == expected


@pytest.mark.parametrize("value", ["fast", "-1", "inf", "nan"])
def test_a_floor_that_is_not_a_positive_rate_is_refused_saying_what_to_set(monkeypatch, value):
    monkeypatch.setenv(MIN_RATE_ENV, value)
    with pytest.raises(ValueError, match=f"{MIN_RATE_ENV}=.*0 or none for no floor"):
        configured_min_rate()


class RecordingSharing(StateSharing):
    created = []  # in the averager's (forked) process

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        RecordingSharing.created.append(self)


async def _report_the_floors(**kwargs):
    """Stands in for load_state_from_peers in the averager's process: returns the floors both ends were given."""
    return {
        "newcomer": kwargs.get("min_rate", "not given"),
        "donor": [s.min_send_rate for s in RecordingSharing.created],
    }, []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value, expected", [("4096", 4096.0), ("none", None)])
def test_an_averager_keeps_the_configured_floor_on_both_ends(monkeypatch, value, expected):
    monkeypatch.setenv(MIN_RATE_ENV, value)
    monkeypatch.setattr(averager_process, "StateSharing", RecordingSharing)  # (a forked process inherits both)
    monkeypatch.setattr(averager_process, "load_state_from_peers", _report_the_floors)
    with dht_swarm(1) as dhts:
        averager = DecentralizedAverager(
            [torch.zeros(3)], dhts[0], prefix="floor_config", start=True, start_method="fork", **FAST
        )
        try:
            metadata, _ = averager.load_state_from_peers(timeout=10)
        finally:
            averager.shutdown()
    assert metadata == {"newcomer": expected, "donor": [expected]}
