"""hivemind.Optimizer calls its factory hooks as 1.1.12 does, so that subclasses written for 1.1.12 keep working:
_make_progress_tracker(target_batch_size, **kwargs) first, then _make_state_averager(**kwargs) and
_make_gradient_averager(factory, **kwargs) with the grad_averager_factory passed positionally and only
``compression`` and ``reuse_grad_buffers`` as keywords; without averager_opts, the factory itself gets 1.1.12's
keywords and no others, in every mode (observed by running 1.1.12 with a recording factory). averager_opts configure
both averagers (1.1.12 gives them to the state averager only), each with the options it takes. What this
implementation needs besides (offloaded gradient buffers, auxiliary mode, the epoch spread of local updates) the
Optimizer adds around the hooks."""

import functools

import pytest
import torch
from optim_swarm_helpers import make_optimizer, mse_step

from hivemind.compression import Float16Compression, NoCompression
from hivemind.dht import DHT
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

STATE_KEYWORDS = [
    "average_opt_statistics", "compression", "delta_rule_averaging", "extra_tensors", "optimizer", "params",
    "performance_ema_alpha", "scheduler", "state_compression",
]  # fmt: skip
GRADIENT_KEYWORDS = ["compression", "reuse_grad_buffers"]


@pytest.fixture
def dht():
    dht = DHT(start=True)
    yield dht
    dht.shutdown()


class FixedShapes(Optimizer):
    """Overrides with 1.1.12's exact keyword lists and no **kwargs."""

    def _make_progress_tracker(self, target_batch_size, *, performance_ema_alpha, min_refresh_period,
                               max_refresh_period, default_refresh_period):  # fmt: skip
        self.calls = [("tracker", target_batch_size)]
        return super()._make_progress_tracker(
            target_batch_size, performance_ema_alpha=performance_ema_alpha, min_refresh_period=min_refresh_period,
            max_refresh_period=max_refresh_period, default_refresh_period=default_refresh_period,
        )  # fmt: skip

    def _make_state_averager(self, *, optimizer, params, scheduler, delta_rule_averaging, average_opt_statistics,
                             extra_tensors, compression, state_compression, performance_ema_alpha):  # fmt: skip
        self.calls.append(("state", self.tracker is not None))  # the tracker is made first
        return super()._make_state_averager(
            optimizer=optimizer, params=params, scheduler=scheduler, delta_rule_averaging=delta_rule_averaging,
            average_opt_statistics=average_opt_statistics, extra_tensors=extra_tensors, compression=compression,
            state_compression=state_compression, performance_ema_alpha=performance_ema_alpha,
        )  # fmt: skip

    def _make_gradient_averager(self, factory, *, reuse_grad_buffers, compression):
        self.calls.append(("gradient", factory))
        return super()._make_gradient_averager(factory, reuse_grad_buffers=reuse_grad_buffers, compression=compression)


class KeywordShapes(Optimizer):
    """Overrides that record what they are given and pass it on (as the 1.1.12 forms with **kwargs do)."""

    def _make_progress_tracker(self, target_batch_size, **kwargs):
        self.calls = [("tracker", target_batch_size)]
        return super()._make_progress_tracker(target_batch_size, **kwargs)

    def _make_state_averager(self, **kwargs):
        self.calls.append(("state", sorted(kwargs)))
        return super()._make_state_averager(**kwargs)

    def _make_gradient_averager(self, factory, **kwargs):
        self.calls.append(("gradient", factory, sorted(kwargs)))
        return super()._make_gradient_averager(factory, **kwargs)


POWER_SGD = functools.partial(PowerSGDGradientAverager, averager_rank=1)
CASES = dict(
    plain={}, local_updates=dict(use_local_updates=True), offload=dict(offload_optimizer=True),
    auxiliary=dict(auxiliary=True, batch_size_per_step=None), factory=dict(grad_averager_factory=POWER_SGD),
)  # fmt: skip


def _train_one_epoch_alone(opt: Optimizer, model: torch.nn.Module) -> bool:
    """Two steps of 4 samples (one epoch) with gradients that are not zero: whether the parameters moved."""
    before = [param.detach().clone() for param in model.parameters()]
    x, y = torch.ones(4, 2), torch.full((4, 1), 10.0)
    while opt.local_epoch == 0:
        mse_step(model, opt, x, y)
    return any(not torch.equal(old, new.detach()) for old, new in zip(before, model.parameters()))


def _check_parts(opt: Optimizer, options: dict) -> None:
    if options.get("use_local_updates"):
        assert opt.grad_averager is None and opt.state_averager.max_epoch_spread == 1
        return
    assert opt.state_averager.max_epoch_spread == 0
    expected_type = PowerSGDGradientAverager if "grad_averager_factory" in options else GradientAverager
    assert type(opt.grad_averager) is expected_type
    assert opt.grad_averager.warn is not options.get("auxiliary", False)  # an auxiliary peer is not told off


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_overrides_with_the_fixed_keywords_of_1_1_12_build_every_part(dht, case):
    options = CASES[case]
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(dht, model, "fixed_shapes", averager_opts=None, **options, optimizer_class=FixedShapes)
    try:
        expected = [("tracker", 8), ("state", True)]
        if not options.get("use_local_updates"):
            expected.append(("gradient", options.get("grad_averager_factory")))
        assert opt.calls == expected
        _check_parts(opt, options)
        if not options.get("auxiliary"):  # (offloaded: the averaged gradients reach the offloaded optimizer)
            assert _train_one_epoch_alone(opt, model)
    finally:
        opt.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_overrides_with_kwargs_receive_what_1_1_12_passes(dht, case):
    options = CASES[case]
    opt = make_optimizer(dht, torch.nn.Linear(2, 1), "kwargs_shapes", **options, optimizer_class=KeywordShapes)
    try:
        expected = [("tracker", 8), ("state", sorted(STATE_KEYWORDS + ["request_timeout"]))]
        if not options.get("use_local_updates"):
            factory = options.get("grad_averager_factory")
            expected.append(("gradient", factory, GRADIENT_KEYWORDS))
            assert opt.grad_averager.request_timeout == 0.5  # (averager_opts=dict(request_timeout=0.5): both)
        assert opt.state_averager.request_timeout == 0.5
        assert opt.calls == expected
        _check_parts(opt, options)
    finally:
        opt.shutdown()


AVERAGER_OPTS = dict(
    request_timeout=0.7, bandwidth=100.0, target_group_size=2,
    sync_epoch_when_averaging=True, parameter_names=["w", "b"],  # (the state averager's alone)
)  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "factory, gradient_only",
    [
        (None, dict(accumulate_grads_on="cpu")),
        (PowerSGDGradientAverager, dict(averager_rank=1, min_compression_ratio=0.9)),
    ],
    ids=["GradientAverager", "PowerSGDGradientAverager"],
)  # fmt: skip
def test_averager_opts_configure_both_averagers_each_with_the_options_it_takes(dht, factory, gradient_only):
    # (before: gradient rounds ignored target_group_size=2, and options of the gradient averager alone were refused)
    opt = make_optimizer(
        dht, torch.nn.Linear(2, 1), "both_averagers_opts", performance_ema_alpha=0.3, grad_averager_factory=factory,
        averager_opts=dict(**AVERAGER_OPTS, **gradient_only),
    )  # fmt: skip
    try:
        state, gradient = opt.state_averager, opt.grad_averager
        assert state.sync_epoch_when_averaging and state.parameter_names == ("w", "b")
        assert state.delay_before_averaging.alpha == 0.3  # the user's performance_ema_alpha
        for averager in (state, gradient):
            assert (averager.request_timeout, averager.bandwidth, averager.target_group_size) == (0.7, 100.0, 2)
        if factory is PowerSGDGradientAverager:
            assert (gradient.rank, gradient.min_compression_ratio) == (1, 0.9)
    finally:
        opt.shutdown()


@pytest.mark.timeout(60)
def test_a_partial_factory_keeps_its_own_values_of_averager_opts(dht):
    # (so a factory can keep 1.1.12's split: here, gradient rounds gather the whole swarm, state rounds pairs)
    opt = make_optimizer(
        dht, torch.nn.Linear(2, 1), "partial_wins", averager_opts=dict(request_timeout=0.7, target_group_size=2),
        grad_averager_factory=functools.partial(GradientAverager, target_group_size=None),
    )  # fmt: skip
    try:
        assert (opt.state_averager.request_timeout, opt.state_averager.target_group_size) == (0.7, 2)
        assert (opt.grad_averager.request_timeout, opt.grad_averager.target_group_size) == (0.7, None)
    finally:
        opt.shutdown()


def test_averager_opts_cannot_repeat_performance_ema_alpha(dht):
    with pytest.raises(TypeError, match="averager_opts cannot set performance_ema_alpha"):
        make_optimizer(dht, torch.nn.Linear(2, 1), "repeated_alpha", averager_opts=dict(performance_ema_alpha=0.5))


@pytest.mark.timeout(60)
def test_a_failing_state_averager_override_stops_the_tracker_made_before_it(dht):
    trackers = []

    class Failing(Optimizer):
        def _make_state_averager(self, **kwargs):
            trackers.append(self.tracker)
            raise ValueError("a broken override")

    with pytest.raises(ValueError, match="broken override"):
        make_optimizer(dht, torch.nn.Linear(2, 1), "failing_state", optimizer_class=Failing)
    assert len(trackers) == 1 and not trackers[0].is_alive()


# what hivemind 1.1.12 passes to a grad_averager_factory, whatever the options (observed for offload_optimizer on and
# off, delay_optimizer_step, delay_grad_averaging, reuse_grad_buffers, grad_compression, auxiliary and averager_opts,
# which 1.1.12 gives to the state averager only)
FACTORY_KEYWORDS_OF_1_1_12 = [
    "allreduce_timeout", "auxiliary", "client_mode", "compression", "dht", "min_matchmaking_time",
    "next_chunk_timeout", "parameters", "prefix", "reuse_grad_buffers", "shutdown_timeout", "start",
]  # fmt: skip
FACTORY_MODES = dict(
    offloaded={}, not_offloaded=dict(offload_optimizer=False), delayed_step=dict(delay_optimizer_step=True),
    delayed_grads=dict(delay_grad_averaging=True), reused_buffers=dict(reuse_grad_buffers=True),
    compressed=dict(grad_compression=Float16Compression()), auxiliary=dict(auxiliary=True, batch_size_per_step=None),
)  # fmt: skip


def _factory_of_1_1_12(calls: list):
    """A grad_averager_factory with the keywords 1.1.12 gives it and no **kwargs; it records each call's keywords."""

    def factory(*, parameters, dht, prefix, reuse_grad_buffers, compression, min_matchmaking_time,
                allreduce_timeout, next_chunk_timeout, shutdown_timeout, client_mode, auxiliary, start):  # fmt: skip
        calls.append({name: value for name, value in locals().items() if name != "calls"})
        return GradientAverager(
            parameters, dht=dht, prefix=prefix, reuse_grad_buffers=reuse_grad_buffers, compression=compression,
            min_matchmaking_time=min_matchmaking_time, allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=next_chunk_timeout, shutdown_timeout=shutdown_timeout, client_mode=client_mode,
            auxiliary=auxiliary, start=start, request_timeout=0.5,
        )  # fmt: skip

    return factory


def _train_until_the_parameters_move(opt: Optimizer, model: torch.nn.Module) -> bool:
    """Steps of 4 samples with gradients that are not zero until epoch 1 and two steps more (a delayed optimizer
    step lands at a later step): whether the parameters moved."""
    before = [param.detach().clone() for param in model.parameters()]
    x, y = torch.ones(4, 2), torch.full((4, 1), 10.0)
    steps_after = 0
    while steps_after < 2:
        steps_after += opt.local_epoch > 0
        if not opt.reuse_grad_buffers:
            opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return any(not torch.equal(old, new.detach()) for old, new in zip(before, model.parameters()))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", list(FACTORY_MODES))
def test_a_grad_averager_factory_written_for_1_1_12_gets_its_keywords_in_every_mode(dht, mode):
    options, calls = FACTORY_MODES[mode], []
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(
        dht, model, f"factory_{mode}", grad_averager_factory=_factory_of_1_1_12(calls), averager_opts=None, **options
    )
    try:
        assert len(calls) == 1 and sorted(calls[0]) == FACTORY_KEYWORDS_OF_1_1_12
        assert calls[0]["reuse_grad_buffers"] is options.get("reuse_grad_buffers", False)
        assert type(calls[0]["compression"]) is type(options.get("grad_compression", NoCompression()))
        assert calls[0]["auxiliary"] is options.get("auxiliary", False)
        assert list(calls[0]["parameters"]) == list(model.parameters())
        assert opt.grad_averager.warn is not options.get("auxiliary", False)  # an auxiliary peer is not told off
        if opt.offload_optimizer:  # the offloaded optimizer steps on the averaged gradients
            with opt.grad_averager.get_tensors() as averaged:
                assert all(
                    grad is param.grad for grad, param in zip(averaged, opt.state_averager.optimizer_parameters)
                )
        if not options.get("auxiliary"):
            assert _train_until_the_parameters_move(opt, model)
    finally:
        opt.shutdown()


@pytest.mark.timeout(60)
def test_a_grad_averager_factory_gets_averager_opts_but_those_of_the_state_averager_alone(dht):
    calls = []

    def factory(**kwargs):
        calls.append(sorted(kwargs))
        return GradientAverager(**kwargs)

    opt = make_optimizer(
        dht, torch.nn.Linear(2, 1), "factory_opts", grad_averager_factory=factory,
        averager_opts=dict(request_timeout=0.5, bandwidth=100.0, sync_epoch_when_averaging=True),
    )  # fmt: skip
    try:
        assert calls == [sorted(FACTORY_KEYWORDS_OF_1_1_12 + ["bandwidth", "request_timeout"])]
        assert (opt.grad_averager.request_timeout, opt.grad_averager.bandwidth) == (0.5, 100.0)
    finally:
        opt.shutdown()


@pytest.mark.timeout(60)
def test_a_grad_averager_factory_of_1_1_12_is_told_that_averager_opts_reach_it(dht):
    # (1.1.12 gives averager_opts to the state averager only: such a factory has no **kwargs to take them)
    calls = []
    with pytest.raises(
        TypeError, match=r"grad_averager_factory takes no \['request_timeout'\].*both averagers.*kwargs"
    ):
        make_optimizer(
            dht, torch.nn.Linear(2, 1), "factory_of_1_1_12_opts", grad_averager_factory=_factory_of_1_1_12(calls),
            averager_opts=dict(request_timeout=0.5, sync_epoch_when_averaging=True),
        )  # fmt: skip
    assert calls == []  # (told before the call, not by the call's own TypeError)
