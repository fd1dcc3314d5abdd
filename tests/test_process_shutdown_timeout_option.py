"""DHT and DecentralizedAverager refuse a shutdown_timeout that is not a number of seconds when they are created:
it used to be accepted, and shutdown() then failed with "unsupported operand type(s) for +: 'float' and 'str'"
after asking the process to stop, leaving its clean-up half done."""

import math
import time

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT


@pytest.mark.parametrize("timeout, error", [("5", TypeError), (math.nan, ValueError)], ids=["str", "nan"])
def test_dht_refuses_a_shutdown_timeout_that_is_not_seconds(timeout, error):
    with pytest.raises(error, match=r"shutdown_timeout must be a number of seconds"):
        DHT(start=False, shutdown_timeout=timeout)


@pytest.mark.parametrize("timeout, error", [("5", TypeError), (math.nan, ValueError)], ids=["str", "nan"])
def test_averager_refuses_a_shutdown_timeout_that_is_not_seconds(timeout, error):
    with DHT(start=True) as dht:
        with pytest.raises(error, match=r"shutdown_timeout must be a number of seconds"):
            DecentralizedAverager([torch.zeros(2)], dht, prefix="st", start=False, shutdown_timeout=timeout)


def test_numbers_of_any_real_type_are_accepted():
    import numpy as np

    with DHT(start=True, shutdown_timeout=np.float32(2.0)) as dht:
        averager = DecentralizedAverager([torch.zeros(2)], dht, prefix="st", start=True, shutdown_timeout=2)
        averager.shutdown()
    with DHT(start=True, shutdown_timeout=None):  # None: wait for the DHT process as long as it takes
        pass


def test_an_averager_with_shutdown_timeout_none_waits_for_its_process_and_it_ends():
    """hivemind 1.1.12 accepts shutdown_timeout=None for the averager (wait as long as it takes); its process still
    finishes its own clean-up within its usual budget, so shutdown() returns soon, with the process ended"""
    with DHT(start=True) as dht:
        averager = DecentralizedAverager([torch.zeros(2)], dht, prefix="st", start=True, shutdown_timeout=None)
        assert averager.is_alive()
        started = time.monotonic()
        averager.shutdown()
        assert time.monotonic() - started < 10
        assert not averager.is_alive() and averager.exitcode == 0
