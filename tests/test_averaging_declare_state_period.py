"""DecentralizedAverager refuses a declare_state_period it could never use, in its constructor."""

import pytest
import torch

from hivemind.averaging.averager import AveragerArgumentError, DecentralizedAverager
from hivemind.dht import DHT


@pytest.fixture(scope="module")
def lone_dht():
    with DHT(start=True) as dht:
        yield dht


@pytest.mark.parametrize("period", [0, -1.5, float("nan"), float("inf"), "30", True])
def test_non_positive_or_non_finite_declare_state_period_is_refused_by_the_constructor(lone_dht, period):
    with pytest.raises(AveragerArgumentError, match="declare_state_period"):
        DecentralizedAverager([torch.zeros(3)], lone_dht, prefix="period", start=False, declare_state_period=period)


def test_positive_declare_state_period_is_accepted(lone_dht):
    averager = DecentralizedAverager(
        [torch.zeros(3)], lone_dht, prefix="period", start=False, declare_state_period=0.5
    )
    assert averager.declare_state_period == 0.5
