"""RemoteMixtureOfExperts (and its switch variant) refuse constructor arguments that cannot work, naming them,
instead of an error from an internal line ("'int' object is not iterable", "empty(): argument 'size'...") or a
forward that fails later."""

import math

import pytest

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts


@pytest.fixture(scope="module")
def lone_dht():
    with DHT(start=True) as dht:
        yield dht


REFUSED = [
    (dict(grid_size=4), TypeError, r"grid_size must be a sequence of positive ints, e.g. \(4,\) or \(8, 8\)"),
    (dict(grid_size=(4.0, 2)), TypeError, "grid_size must be a sequence of positive ints"),
    (dict(k_best="2"), TypeError, "k_best must be an int"),
    (dict(k_min=0.5), TypeError, "k_min must be an int"),
    (dict(uid_prefix=5), TypeError, "uid_prefix must be a str such as 'ffn.'"),
    (dict(in_features="4"), TypeError, "in_features must be an int"),
    (dict(forward_timeout=-1), ValueError, "forward_timeout must be None or a positive number of seconds"),
    (dict(forward_timeout="1"), TypeError, "forward_timeout must be None or a positive number of seconds"),
    (dict(backward_timeout=math.nan), ValueError, "backward_timeout must be None or a positive number"),
    (dict(timeout_after_k_min=-0.5), ValueError, "timeout_after_k_min must be None or a non-negative number"),
]


@pytest.mark.parametrize("layer", [RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts])
@pytest.mark.parametrize("overrides, error, message", REFUSED)
def test_unworkable_arguments_are_refused(lone_dht, layer, overrides, error, message):
    kwargs = dict(in_features=4, grid_size=(4, 4), dht=lone_dht, uid_prefix="ffn.", k_best=2, k_min=1)
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        layer(**kwargs)


@pytest.mark.parametrize("dht", [None, "dht"])
def test_something_that_is_not_a_dht_is_refused(dht):
    with pytest.raises(TypeError, match="dht must be a running hivemind.DHT"):
        RemoteMixtureOfExperts(in_features=4, grid_size=(4,), dht=dht, uid_prefix="ffn.", k_best=1)


def test_plausible_arguments_are_still_accepted(lone_dht):
    import numpy as np

    layer = RemoteMixtureOfExperts(
        in_features=np.int64(4), grid_size=[np.int64(4), 2], dht=lone_dht, uid_prefix="ffn", k_best=2,
        forward_timeout=math.inf, timeout_after_k_min=np.float32(1.0), backward_timeout=5,
    )  # fmt: skip
    assert layer.grid_size == (4, 2) and layer.uid_prefix == "ffn."


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(jitter_eps=-0.01), r"jitter_eps must be a non-negative number"),
        (dict(jitter_eps=math.nan), r"jitter_eps must be a non-negative number"),
        (dict(utilization_alpha=2.0), r"utilization_alpha must be in \[0, 1\]"),
        (dict(utilization_alpha=-0.1), r"utilization_alpha must be in \[0, 1\]"),
    ],
    ids=["negative-jitter", "nan-jitter", "alpha-above-one", "negative-alpha"],
)
def test_switch_refuses_a_jitter_or_utilization_alpha_that_cannot_work(lone_dht, overrides, message):
    # before: accepted; a negative jitter failed every training forward in torch ("uniform_ expects to return a
    # [from, to) range"), an alpha above 1 made the utilization average (and the balancing loss) diverge, and a
    # negative one is no moving average at all
    with pytest.raises(ValueError, match=message):
        RemoteSwitchMixtureOfExperts(in_features=4, grid_size=(4,), dht=lone_dht, uid_prefix="ffn.", **overrides)
