"""A donor whose state has the right shapes but unusable values (a learning rate that is a string or NaN, parameters
or optimizer statistics with inf/NaN): the newcomer refuses it whole and keeps training with its own state."""

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, mse_step, parameter_averagers  # noqa: F401 (a fixture)

from hivemind.optim.optimizer_state import OptimizerStateError, dump_optimizer_state, load_optimizer_state
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager


def adam(params):
    return torch.optim.Adam(params, lr=0.05)


def set_learning_rate(opt, value):
    opt.opt.param_groups[0]["lr"] = value


@torch.no_grad()
def fill_first_parameter(opt, value):
    opt.state_averager.optimizer_parameters[0].fill_(value)


@torch.no_grad()
def fill_first_statistic(opt, value):
    next(iter(opt.opt.state.values()))["exp_avg"].fill_(value)


CORRUPTIONS = {
    "lr-is-a-string": lambda opt: set_learning_rate(opt, "abc"),
    "lr-is-none": lambda opt: set_learning_rate(opt, None),
    "lr-is-nan": lambda opt: set_learning_rate(opt, float("nan")),
    "amsgrad-is-a-number": lambda opt: opt.opt.param_groups[0].__setitem__("amsgrad", 3),
    "parameter-is-nan": lambda opt: fill_first_parameter(opt, float("nan")),
    "parameter-is-inf": lambda opt: fill_first_parameter(opt, float("inf")),
    "statistic-is-nan": lambda opt: fill_first_statistic(opt, float("nan")),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_a_donor_state_with_unusable_values_is_refused_and_training_goes_on(dht_pair, corrupt):  # noqa: F811
    run_id = f"bad_donor_values_{abs(hash(corrupt))}"
    donor_model, newcomer_model = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    x, y = torch.randn(4, 4), torch.randn(4, 1)
    donor = make_optimizer(dht_pair[0], donor_model, run_id=run_id, optimizer=adam, load_state_timeout=5.0)
    newcomer = None
    try:
        while donor.local_epoch < 1:
            mse_step(donor_model, donor, x, y)
        corrupt(donor)
        newcomer = make_optimizer(dht_pair[1], newcomer_model, run_id=run_id, optimizer=adam, load_state_timeout=5.0)
        before = [param.detach().clone() for param in newcomer_model.parameters()]
        newcomer.load_state_from_peers()
        assert all(torch.equal(param, old) for param, old in zip(newcomer_model.parameters(), before))
        assert newcomer.opt.param_groups[0]["lr"] == 0.05 and newcomer.opt.param_groups[0]["amsgrad"] is False
        for statistics in newcomer.opt.state.values():
            assert all(torch.isfinite(value).all() for value in statistics.values())
        start_epoch = newcomer.local_epoch
        while newcomer.local_epoch < start_epoch + 1:  # an epoch end runs the optimizer step on the kept state
            mse_step(newcomer_model, newcomer, x, y)
        assert all(torch.isfinite(param).all() for param in newcomer_model.parameters())
    finally:
        donor.shutdown()
        if newcomer is not None:
            newcomer.shutdown()


def custom_hyperparameter(local):
    """An SGD whose param group has a hyperparameter "custom" = ``local``, its flat metadata, and where that is."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    opt.param_groups[0]["custom"] = "where"
    metadata = [dict(entry) for entry in dump_optimizer_state(opt)[0]]
    position = metadata.index({"type": "value", "value": "where"})
    opt.param_groups[0]["custom"] = metadata[position]["value"] = local
    return opt, metadata, position


@pytest.mark.parametrize(
    "local, donor",
    [(0.05, value) for value in ("abc", None, True, float("nan"), float("inf"))]
    + [(False, value) for value in (0, 1.0, "x")]
    + [(None, 0.5), ("adam", 1), ("adam", True)],
)
def test_a_hyperparameter_of_another_kind_is_refused_and_nothing_changes(local, donor):
    opt, metadata, position = custom_hyperparameter(local)
    metadata[position]["value"] = donor
    with pytest.raises(OptimizerStateError, match=f"entry {position} "):
        load_optimizer_state(opt, metadata, [])
    assert opt.param_groups[0]["custom"] is local


@pytest.mark.parametrize(
    "local, donor", [(0.05, 1), (0.05, 1e-9), (3, 0.5), (False, True), (None, False), (None, "x"), ("x", None)]
)
def test_a_hyperparameter_of_the_same_kind_is_taken_from_the_donor(local, donor):
    opt, metadata, position = custom_hyperparameter(local)
    metadata[position]["value"] = donor
    load_optimizer_state(opt, metadata, [])
    assert opt.param_groups[0]["custom"] == donor and type(opt.param_groups[0]["custom"]) is type(donor)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_the_legacy_training_averager_refuses_a_donor_with_non_finite_parameters(dht_pair, value):  # noqa: F811
    params = [torch.nn.Parameter(torch.full((2,), 1.0)) for _ in range(2)]
    averagers = parameter_averagers(params, dht_pair, prefix=f"legacy_bad_donor_{value}", start=True)
    try:
        with torch.no_grad():
            params[0].fill_(value)
        assert averagers[1].load_state_from_peers(timeout=10) is None
        assert torch.equal(params[1], torch.full((2,), 1.0))
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.timeout(60)
def test_a_power_sgd_donor_with_non_finite_q_matrices_is_refused(dht_pair):  # noqa: F811
    models = [torch.nn.Linear(12, 16) for _ in range(2)]
    averagers = [
        PowerSGDGradientAverager(model.parameters(), 2, dht=dht, prefix="psgd_bad_donor", start=True)
        for model, dht in zip(models, dht_pair)
    ]
    try:
        before = averagers[1]._qs[0].clone()
        with averagers[0].lock_averaged_tensors, torch.no_grad():
            averagers[0]._qs[0][0, 0] = float("nan")
        assert averagers[1].load_state_from_peers(timeout=10) is None
        assert torch.equal(averagers[1]._qs[0], before)
    finally:
        for averager in averagers:
            averager.shutdown()
