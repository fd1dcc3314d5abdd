"""Misuse of hivemind.Optimizer is refused with a clear ValueError before anything changes, and never wedges it."""

import time

import pytest
import torch
from optim_swarm_helpers import make_optimizer

from hivemind.dht import DHT


@pytest.fixture(scope="module")
def lonely():
    dht = DHT(start=True)
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(dht, model, "misuse", target_batch_size=1000, batch_size_per_step=2, averaging_timeout=3.0)
    yield model, opt
    opt.shutdown()
    dht.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size", [2.5, True, "3", -4, 0, float("nan")], ids=repr)
def test_a_bad_batch_size_is_refused_and_the_next_good_step_still_counts(lonely, batch_size):
    model, opt = lonely
    model(torch.ones(1, 2)).sum().backward()
    samples_before = opt.tracker.local_progress.samples_accumulated
    with pytest.raises(ValueError, match="batch_size"):
        opt.step(batch_size=batch_size)
    assert opt.tracker.local_progress.samples_accumulated == samples_before
    opt.step(batch_size=2)
    assert opt.tracker.local_progress.samples_accumulated == samples_before + 2
    assert opt.local_epoch == 0


@pytest.mark.timeout(60)
def test_a_numpy_integer_batch_size_counts_as_an_int(lonely):
    np = pytest.importorskip("numpy")
    model, opt = lonely
    model(torch.ones(1, 2)).sum().backward()
    samples_before = opt.tracker.local_progress.samples_accumulated
    opt.step(batch_size=np.int64(3))
    assert opt.tracker.local_progress.samples_accumulated == samples_before + 3


@pytest.mark.timeout(60)
def test_load_state_from_peers_retries_an_immediate_error_calmly_and_within_its_timeout(lonely, monkeypatch):
    model, opt = lonely
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["timeout"])
        raise RuntimeError("the averager's process is gone")

    monkeypatch.setattr(opt.state_averager, "load_state_from_peers", failing_load)
    monkeypatch.setattr(opt, "load_state_timeout", 2.5)
    started = time.monotonic()
    opt.load_state_from_peers()
    assert time.monotonic() - started < 2.5 + 1.0
    assert 1 <= len(calls) <= 3, f"{len(calls)} attempts in 2.5 s"
    assert all(0 <= timeout <= 2.5 for timeout in calls)
    assert opt.local_epoch == 0
