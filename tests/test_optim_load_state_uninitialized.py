"""A training averager made with initialize_optimizer=False (its optimizer has no statistics yet) still loads a
donor's state: its own statistics are created first (as a fresh optimizer's), so that the donor's fit them."""

import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.training_averager import TrainingAverager


@pytest.fixture
def dht_pair():
    first = DHT(start=True)
    second = DHT(start=True, initial_peers=first.get_visible_maddrs())
    yield first, second
    second.shutdown()
    first.shutdown()


def _trained_adam(model: torch.nn.Module) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, model.in_features, generator=torch.Generator().manual_seed(0))).sum().backward()
    opt.step()
    return opt


def _load_when_declared(newcomer, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # until the donor's declaration is visible
        loaded = newcomer.load_state_from_peers(timeout=10)
        if loaded is not None:
            return loaded
        time.sleep(0.2)
    raise AssertionError("the newcomer loaded no state")


def _assert_same_optimizer_state(mine: torch.optim.Optimizer, theirs: torch.optim.Optimizer):
    for param, donor_param in zip(mine.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        for name, value in theirs.state[donor_param].items():
            assert torch.equal(mine.state[param][name], value), name


@pytest.mark.timeout(60)
def test_legacy_training_averager_without_optimizer_statistics_loads_the_donors_state(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dht_pair]
    donor_opt, newcomer_opt = _trained_adam(models[0]), torch.optim.Adam(models[1].parameters(), lr=0.1)
    options = dict(average_parameters=True, average_gradients=False, prefix="uninit_ta", start=True)
    donor = TrainingAverager(donor_opt, dht=dht_pair[0], declare_state_period=1.0, **options)
    newcomer = TrainingAverager(newcomer_opt, dht=dht_pair[1], initialize_optimizer=False, **options)
    try:
        assert not newcomer_opt.state
        _load_when_declared(newcomer)
        assert torch.equal(models[1].weight, models[0].weight) and torch.equal(models[1].bias, models[0].bias)
        _assert_same_optimizer_state(newcomer_opt, donor_opt)
    finally:
        newcomer.shutdown()
        donor.shutdown()


@pytest.mark.timeout(60)
def test_state_averager_without_optimizer_statistics_loads_the_donors_state(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dht_pair]
    donor_opt = _trained_adam(models[0])
    donor = TrainingStateAverager(
        dht=dht_pair[0], optimizer=donor_opt, prefix="uninit_tsa", start=True, declare_state_period=1.0
    )
    newcomer = TrainingStateAverager(
        dht=dht_pair[1], optimizer=lambda params: torch.optim.Adam(params, lr=0.1), params=models[1].parameters(),
        initialize_optimizer=False, prefix="uninit_tsa", start=True,
    )  # fmt: skip
    try:
        assert not newcomer.optimizer.state
        donor.local_epoch = 2
        _load_when_declared(newcomer)
        assert newcomer.local_epoch == 2
        assert torch.equal(models[1].weight, models[0].weight) and torch.equal(models[1].bias, models[0].bias)
        _assert_same_optimizer_state(newcomer.optimizer, donor_opt)
    finally:
        newcomer.shutdown()
        donor.shutdown()


def _uninitialized_state_averager(dht, model, prefix, **kwargs):
    return TrainingStateAverager(
        dht=dht, optimizer=lambda params: torch.optim.Adam(params, lr=0.1), params=model.parameters(),
        initialize_optimizer=False, prefix=prefix, start=True, **kwargs,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_state_averager_without_optimizer_statistics_loads_a_donor_that_has_none_either(dht_pair):
    """Peers made alike (initialize_optimizer=False) that have not stepped yet share no statistics: 1.1.12 loads such
    a donor's parameters and epoch, so a newcomer's statistics must not keep it from doing so."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dht_pair]
    donor = _uninitialized_state_averager(dht_pair[0], models[0], "uninit_both", declare_state_period=1.0)
    newcomer = _uninitialized_state_averager(dht_pair[1], models[1], "uninit_both")
    try:
        donor.local_epoch = 3
        _load_when_declared(newcomer)
        assert newcomer.local_epoch == 3
        assert torch.equal(models[1].weight, models[0].weight) and torch.equal(models[1].bias, models[0].bias)
        assert not newcomer.optimizer.state  # as the donor's: a fresh optimizer's
    finally:
        newcomer.shutdown()
        donor.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["state_averager", "legacy"])
def test_optimizer_without_statistics_is_left_unchanged_when_no_donor_answers(dht_pair, kind):
    model = torch.nn.Linear(3, 2)
    if kind == "legacy":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        options = dict(average_parameters=True, average_gradients=False, initialize_optimizer=False, start=True)
        averager = TrainingAverager(opt, dht=dht_pair[1], prefix="uninit_alone", **options)
    else:
        averager = _uninitialized_state_averager(dht_pair[1], model, "uninit_alone")
        opt = averager.optimizer
    try:
        assert averager.load_state_from_peers(timeout=2) is None
        assert not opt.state, "the optimizer was given statistics although no state was loaded"
    finally:
        averager.shutdown()


class _SchedulerDuringDownload(TrainingStateAverager):
    """Its learning rate changes while a downloaded state is checked (as a scheduler in another thread may change
    it), and the state is refused."""

    def _apply_downloaded_state(self, metadata, tensors):
        self.optimizer.param_groups[0]["lr"] = 0.5
        raise ValueError("refused by the test")


@pytest.mark.timeout(60)
def test_hyperparameters_changed_during_a_refused_download_are_kept(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dht_pair]
    donor = _SchedulerDuringDownload(  # (the same class: the name of the handler a newcomer calls)
        dht=dht_pair[0], optimizer=_trained_adam(models[0]), prefix="uninit_lr", start=True, declare_state_period=1.0
    )
    newcomer = _SchedulerDuringDownload(
        dht=dht_pair[1], optimizer=lambda params: torch.optim.Adam(params, lr=0.1), params=models[1].parameters(),
        initialize_optimizer=False, prefix="uninit_lr", start=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while newcomer.optimizer.param_groups[0]["lr"] != 0.5 and time.monotonic() < deadline:
            assert newcomer.load_state_from_peers(timeout=10) is None  # (until the donor's declaration is visible)
        assert newcomer.optimizer.param_groups[0]["lr"] == 0.5
        assert not newcomer.optimizer.state
    finally:
        newcomer.shutdown()
        donor.shutdown()


class _CountingAttempts(TrainingStateAverager):
    """Counts its attempts to download a state (the donor is of this class too: the handler a newcomer calls)."""

    attempts = 0

    def _load_state_from_peers_excluding(self, exclude, timeout=None, **kwargs):
        self.attempts += 1
        return super()._load_state_from_peers_excluding(exclude, timeout=timeout, **kwargs)


@pytest.mark.timeout(60)
def test_an_optimizer_that_keeps_no_statistics_asks_each_donor_once(dht_pair):
    """SGD without momentum has no statistics to create: one download attempt, not a second one alike."""
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    donor = _CountingAttempts(
        dht=dht_pair[0], optimizer=sgd, params=torch.nn.Linear(3, 2).parameters(), prefix="uninit_sgd", start=True,
        declare_state_period=1.0,
    )  # fmt: skip
    newcomer = _CountingAttempts(  # other shapes: the donor's state is refused
        dht=dht_pair[1], optimizer=sgd, params=torch.nn.Linear(4, 2).parameters(), initialize_optimizer=False,
        prefix="uninit_sgd", start=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while dht_pair[1].get("uninit_sgd.all_averagers", latest=True) is None:
            assert time.monotonic() < deadline, "the donor's declaration never showed"
            time.sleep(0.2)
        assert newcomer.load_state_from_peers(timeout=10) is None
        assert newcomer.attempts == 1
    finally:
        newcomer.shutdown()
        donor.shutdown()
