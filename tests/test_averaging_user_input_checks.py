"""DecentralizedAverager refuses, where they are passed, inputs that used to be accepted and then failed later:
inside the averager's process, at the first step, or with an error from some internal line."""

import math

import pytest
import torch

from hivemind.averaging.averager import AveragerArgumentError, DecentralizedAverager
from hivemind.dht import DHT


@pytest.fixture(scope="module")
def lone_dht():
    with DHT(start=True) as dht:
        yield dht


def test_a_prefix_too_long_for_the_handler_names_is_refused(lone_dht):
    # the handler names "<prefix>::DecentralizedAverager.rpc_*" must fit libp2p's 1023 bytes: peers saw each other
    # under the group key, but could never join a group (every call failed with "stream reset")
    with pytest.raises(AveragerArgumentError, match=r"prefix .* bytes.*shorter prefix"):
        DecentralizedAverager([torch.zeros(3)], lone_dht, prefix="x" * 1000, start=False)
    DecentralizedAverager([torch.zeros(3)], lone_dht, prefix="x" * 900, start=False)  # fits


@pytest.mark.parametrize("dht", [None, "dht", pytest.param(["dht"], id="a-list")])
def test_something_that_is_not_a_dht_is_refused(dht):
    with pytest.raises(TypeError, match="dht must be a running hivemind.DHT"):
        DecentralizedAverager([torch.zeros(3)], dht, prefix="p", start=False)


@pytest.mark.parametrize("infos", [[None], [torch.zeros(3)], [0]])
def test_tensor_infos_that_are_not_compression_infos_are_refused(lone_dht, infos):
    # each round read info.get_part() of every tensor: the averager's process failed every step
    with pytest.raises(TypeError, match=r"tensor_infos\[0\] must be a CompressionInfo.*CompressionInfo.from_tensor"):
        DecentralizedAverager([torch.zeros(3)], lone_dht, prefix="p", start=False, tensor_infos=infos)


def test_an_infinite_matchmaking_time_is_refused(lone_dht):
    # it was accepted, and every step() then failed, blaming a scheduled_time the user never passed
    with pytest.raises(AveragerArgumentError, match="min_matchmaking_time must be a finite"):
        DecentralizedAverager([torch.zeros(3)], lone_dht, prefix="p", start=False, min_matchmaking_time=math.inf)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "timeout, error",
    [("1", TypeError), (math.nan, ValueError), (-1.0, ValueError)],
    ids=["str", "nan", "negative"],
)
def test_load_state_from_peers_refuses_a_timeout_that_is_not_a_duration(lone_dht, timeout, error):
    # before: "'<' not supported between instances of 'str' and 'float'", "cannot convert float NaN to integer", or
    # for -1 a TimeoutError blaming get_current_state()
    averager = DecentralizedAverager([torch.zeros(3)], lone_dht, prefix="lsp", start=True)
    try:
        with pytest.raises(error, match="timeout must be None or a non-negative number of seconds"):
            averager.load_state_from_peers(timeout=timeout)
        for valid in (0.5, math.inf):  # nobody shares a state: a valid timeout works
            assert averager.load_state_from_peers(timeout=valid) is None
    finally:
        averager.shutdown()
