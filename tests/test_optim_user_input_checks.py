"""hivemind.Optimizer and TrainingStateAverager refuse inputs that used to pass and then fail inside (an
AttributeError, a comparison of str with int, "no tensor statistic 'e'") or at the first load_state_from_peers()."""

import functools
import inspect
import math

import pytest
import torch

import hivemind
from hivemind.dht import DHT
from hivemind.optim.state_averager import TrainingStateAverager


@pytest.fixture(scope="module")
def lone_dht():
    with DHT(start=True) as dht:
        yield dht


def make_optimizer(dht, **overrides):
    model = torch.nn.Linear(2, 2)
    kwargs = dict(
        dht=dht, run_id="checks", target_batch_size=4, batch_size_per_step=1, params=model.parameters(),
        optimizer=functools.partial(torch.optim.Adam, lr=0.1), matchmaking_time=1.0, averaging_timeout=3.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return hivemind.Optimizer(**kwargs)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(averaging_timeout="60"), TypeError, "averaging_timeout must be a positive number of seconds"),
        (dict(matchmaking_time=math.nan), ValueError, "matchmaking_time must be a positive number of seconds"),
        (dict(load_state_timeout="600"), TypeError, "load_state_timeout must be a positive number of seconds"),
        (dict(load_state_timeout=-1), ValueError, "load_state_timeout must be a positive number of seconds"),
        (dict(load_state_timeout=math.nan), ValueError, "load_state_timeout must be a positive number"),
        (dict(average_opt_statistics="exp_avg_sq"), TypeError, r"names.*\('exp_avg_sq',\)"),
        (dict(extra_tensors=[1.0]), TypeError, r"extra_tensors\[0\] must be a torch.Tensor"),
        (dict(use_local_updates=True, averager_opts=dict(accumulate_grads_on="cpu", bandwidth=1e6)), ValueError,
         r"use_local_updates averages no gradients.*\[\"averager_opts' accumulate_grads_on\"\]"),
    ],
    ids=["str-averaging-timeout", "nan-matchmaking", "str-load-timeout", "negative-load", "nan-load", "str-stats",
         "float-extra", "local-updates-gradient-averager-opts"],
)  # fmt: skip
def test_optimizer_refuses_inputs_that_cannot_work(lone_dht, overrides, error, message):
    with pytest.raises(error, match=message):
        make_optimizer(lone_dht, **overrides)


@pytest.mark.parametrize("dht", [None, "dht"])
def test_optimizer_refuses_something_that_is_not_a_dht(dht):
    with pytest.raises(TypeError, match="dht must be a running hivemind.DHT"):
        make_optimizer(dht)


def test_state_averager_refuses_statistics_given_as_one_string_and_non_tensor_extras(lone_dht):
    model = torch.nn.Linear(2, 2)
    common = dict(dht=lone_dht, optimizer=torch.optim.Adam, params=model.parameters(), prefix="sa", start=False)
    with pytest.raises(TypeError, match=r"average_opt_statistics must be a sequence of names.*\('exp_avg_sq',\)"):
        TrainingStateAverager(average_opt_statistics="exp_avg_sq", **common)
    with pytest.raises(TypeError, match=r"extra_tensors\[1\] must be a torch.Tensor, got ndarray"):
        TrainingStateAverager(extra_tensors=[torch.zeros(2), model.weight.detach().numpy()], **common)


def test_extra_tensors_given_as_a_generator_are_all_kept(lone_dht):
    # (e.g. model.buffers(): the type check must not use up the iterator before the averager takes the tensors)
    model = torch.nn.BatchNorm1d(3)
    averager = TrainingStateAverager(
        dht=lone_dht, optimizer=torch.optim.Adam, params=model.parameters(), prefix="gen", start=False,
        extra_tensors=model.buffers(), average_opt_statistics=iter(["exp_avg_sq"]),
    )  # fmt: skip
    assert len(averager.extra_tensors) == 3 and averager.average_opt_statistics == ("exp_avg_sq",)


def test_an_infinite_load_state_timeout_is_still_accepted(lone_dht):
    optimizer = make_optimizer(
        lone_dht, run_id="inf", load_state_timeout=math.inf, average_opt_statistics=["exp_avg_sq"]
    )
    optimizer.shutdown()


def test_an_infinite_averaging_timeout_is_accepted_and_a_lone_peer_steps(lone_dht):
    # it becomes the averagers' allreduce_timeout: no limit on a round (hivemind 1.1.12 runs with it too)
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(lone_dht, run_id="inf_averaging", averaging_timeout=math.inf, params=model.parameters())
    try:
        for _ in range(4):  # target_batch_size samples: the lone peer ends the epoch by itself
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert optimizer.local_epoch == 1
    finally:
        optimizer.shutdown()


def test_gradient_averager_refuses_a_single_tensor_as_parameters(lone_dht):
    # it was taken row by row: the rows are not leaves, never get a .grad, and zeros were averaged instead
    from hivemind.optim.grad_averager import GradientAverager

    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"parameters must be an iterable of parameters.*\[tensor\]"):
        GradientAverager(model.weight, dht=lone_dht, prefix="one", start=False)


@pytest.mark.parametrize(
    "averager_opts, message",
    [
        (dict(prefix="mine"), r"averager_opts cannot set prefix: .*run_id"),
        (dict(min_matchmaking_time=2.0), r"averager_opts cannot set min_matchmaking_time: .*matchmaking_time="),
        (dict(compression=None), r"averager_opts cannot set compression: .*grad_compression="),
        (dict(reuse_grad_buffers=True), r"averager_opts cannot set reuse_grad_buffers: .*reuse_grad_buffers="),
        ([("bandwidth", 1.0), 5], r"averager_opts must be a dict of DecentralizedAverager options"),
        (dict(parameters=[]), r"averager_opts cannot set parameters: .*main_parameters"),
    ],
    ids=["prefix", "matchmaking", "compression", "reuse", "not-a-dict", "parameters"],
)
def test_averager_opts_that_the_optimizer_sets_itself_are_refused(lone_dht, averager_opts, message):
    # before: "TrainingStateAverager() got multiple values for keyword argument 'prefix'" (or, for options only the
    # gradient averager takes, that error after the state averager had started)
    with pytest.raises(TypeError, match=message):
        make_optimizer(lone_dht, averager_opts=averager_opts)


def test_step_refuses_a_closure_that_is_not_callable(lone_dht):
    optimizer = make_optimizer(lone_dht, run_id="closure")
    try:
        with pytest.raises(TypeError, match=r"closure must be None or a callable that returns the loss.*got float"):
            optimizer.step(closure=0.5)  # e.g. the loss itself
    finally:
        optimizer.shutdown()


@pytest.mark.parametrize(
    "batch_size, error", [("2", TypeError), (math.nan, ValueError), (math.inf, ValueError)], ids=["str", "nan", "inf"]
)
def test_gradient_averager_refuses_a_batch_size_that_is_not_a_count(lone_dht, batch_size, error):
    # before: "'<=' not supported between instances of 'str' and 'int'", or NaN/inf accepted into the sample count
    # (and the averaging weight)
    from hivemind.optim.grad_averager import GradientAverager

    averager = GradientAverager(torch.nn.Linear(2, 2).parameters(), dht=lone_dht, prefix="bs", start=False)
    with pytest.raises(error, match="batch_size must be a positive number of samples"):
        averager.accumulate_grads_(batch_size)
    assert averager.local_samples_accumulated == 0


def test_a_run_id_too_long_for_the_averagers_handler_names_is_refused_under_its_own_name(lone_dht):
    # before: the state averager's prefix check fired, naming a "prefix" the user never passed
    with pytest.raises(ValueError, match=r"run_id is 1000 bytes long.*use a run_id of at most \d+ bytes"):
        make_optimizer(lone_dht, run_id="r" * 1000)


def test_the_averager_opts_of_one_averager_alone_are_those_the_other_does_not_take():
    # (averager_opts go to both averagers but these, which each goes to the one averager that takes it)
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.optim.grad_averager import GradientAverager
    from hivemind.optim.optimizer_options import _OPTIMIZER_SETS, GRADIENT_AVERAGER_ONLY, STATE_AVERAGER_ONLY
    from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

    def names(averager_type):
        return set(inspect.signature(averager_type.__init__).parameters) - {"self", "kwargs"} - set(_OPTIMIZER_SETS)

    state, gradient = names(TrainingStateAverager), names(GradientAverager) | names(PowerSGDGradientAverager)
    assert STATE_AVERAGER_ONLY == state - gradient
    assert GRADIENT_AVERAGER_ONLY == gradient - state - names(DecentralizedAverager)
