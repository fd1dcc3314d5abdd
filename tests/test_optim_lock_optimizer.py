"""TrainingStateAverager's lock_optimizer and its background work: a call that would wait for work that needs the
lock while the caller holds it raises RuntimeError instead of hanging; steps requested while an earlier delayed step
is queued run in order, each on its own gradients (see docs/optimizer.md)."""

import gc
import threading
import time

import pytest
import torch
from optim_swarm_helpers import dht_pair

from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.state_lock import GradientHandover

__all__ = ["dht_pair"]  # the fixture, used below


def sgd_averager(dht, prefix: str):
    """A linear model (weights of zeros) and its started, offloaded TrainingStateAverager (SGD, lr 0.1); the
    model's gradients are ones."""
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    averager = TrainingStateAverager(
        dht=dht, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
        offload_optimizer=True, prefix=prefix, start=True,
    )  # fmt: skip
    set_gradients(model, 1.0)
    return model, averager


def set_gradients(model: torch.nn.Module, value: float) -> None:
    for param in model.parameters():
        param.grad = torch.full_like(param, value)


def in_a_thread(function, timeout: float = 10.0):
    """Run ``function()`` in a daemon thread for up to ``timeout`` s; returns ("returned", result), ("raised",
    exception), or ("running", None) if it has not ended by then (a hang)."""
    outcome = [("running", None)]

    def run():
        try:
            outcome[0] = ("returned", function())
        except BaseException as e:
            outcome[0] = ("raised", e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0]


@pytest.mark.timeout(90)
def test_a_step_under_the_lock_waiting_for_a_queued_averaging_round_raises_instead_of_hanging(dht_pair):
    # the queued round reads the state under lock_optimizer before it starts: waiting for it there never ended
    model, averager = sgd_averager(dht_pair[0], "lock_queued_round")
    try:

        def round_then_wait_under_the_lock():
            with averager.lock_optimizer:
                averager.step(averaging_round=True, delay_averaging=True, averaging_opts=dict(timeout=5))
                averager.step(wait_for_delayed_updates=True)

        kind, error = in_a_thread(round_then_wait_under_the_lock)
        assert kind == "raised", f"step() under lock_optimizer waiting for a queued round: {kind}"
        assert isinstance(error, RuntimeError) and "lock_optimizer" in str(error) and "averaging round" in str(error)
        (pending,) = averager.pending_updates  # the round goes on once the lock is released (alone: no group)
        pending.exception(30)
        averager.step()
        assert averager.pending_updates == set()
    finally:
        averager.shutdown()


@pytest.mark.timeout(90)
def test_a_step_under_the_lock_waits_for_a_round_that_has_read_the_state(dht_pair):
    # past reading the state, a round only waits for peers (within its timeout): waiting for it is fine
    model, averager = sgd_averager(dht_pair[0], "lock_round_read")
    state_read, go_on = threading.Event(), threading.Event()
    try:
        averager.step(
            averaging_round=True, delay_averaging=True, averaging_opts=dict(timeout=5),
            wait_for_trigger=lambda: (state_read.set(), go_on.wait(30)),
        )  # fmt: skip
        assert state_read.wait(30)

        def wait_under_the_lock():
            with averager.lock_optimizer:
                go_on.set()
                averager.step(wait_for_delayed_updates=True)

        kind, error = in_a_thread(wait_under_the_lock, timeout=40)
        assert (kind, error) == ("returned", None)
        assert averager.pending_updates == set()  # the (failed) round was waited for and applied
    finally:
        go_on.set()
        averager.shutdown()


@pytest.mark.timeout(60)
def test_waiting_for_the_background_step_under_the_lock_raises_instead_of_hanging(dht_pair):
    model, averager = sgd_averager(dht_pair[0], "lock_wait_step")
    try:

        def step_then_wait_under_the_lock():
            with averager.lock_optimizer:
                averager.step(optimizer_step=True, delay_optimizer_step=True)
                averager.wait_for_background_step()

        kind, error = in_a_thread(step_then_wait_under_the_lock)
        assert kind == "raised" and isinstance(error, RuntimeError) and "lock_optimizer" in str(error)
        averager.wait_for_background_step()  # released: the step runs
        averager.step()
        assert torch.allclose(model.weight, torch.full_like(model.weight, -0.1))
    finally:
        averager.shutdown()


@pytest.mark.timeout(60)
def test_get_current_state_under_the_lock_before_the_epochs_step_raises_at_once(dht_pair):
    # the state of the new epoch waits for the step that ends the last one, which cannot run while the lock is held:
    # this waited STATE_READY_TIMEOUT (20 s), then blamed a step 'still running'
    model, averager = sgd_averager(dht_pair[0], "lock_current_state")
    try:

        def end_the_epoch_and_read_the_state_under_the_lock():
            with averager.lock_optimizer:
                averager.move_to_epoch(1, step_follows=True)
                averager.step(optimizer_step=True, delay_optimizer_step=True)
                return averager.get_current_state()

        started = time.monotonic()
        kind, error = in_a_thread(end_the_epoch_and_read_the_state_under_the_lock, timeout=40)
        assert kind == "raised" and isinstance(error, RuntimeError), (kind, error)
        assert "lock_optimizer" in str(error) and time.monotonic() - started < 15
        metadata, tensors, _ = averager.get_current_state()  # released: the step runs, then the state is served
        assert metadata["epoch"] == 1 and torch.allclose(tensors[0], torch.full_like(tensors[0], -0.1))
    finally:
        averager.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "second, expected_weight",
    [
        (dict(optimizer_step=True, delay_optimizer_step=True), -0.1 - 1.0),  # both steps, each on its own gradients
        (dict(optimizer_step=True), -0.1 - 1.0),
        (dict(zero_grad=True), -0.1),  # the queued step still uses the gradients it was given
    ],
)
def test_steps_requested_without_waiting_behind_a_queued_step_run_in_order_on_their_own_gradients(
    dht_pair, second, expected_weight
):
    # with wait_for_delayed_updates=False the second request loaded its gradients into (or zeroed) the buffers that
    # the queued step had not used yet: it then stepped on the second gradients (-2.0), or on none (0.0)
    model, averager = sgd_averager(dht_pair[0], "lock_in_order")
    release = threading.Event()
    try:
        averager.submit_background(release.wait, 30)  # the first step stays queued until this is released
        averager.step(optimizer_step=True, delay_optimizer_step=True)
        set_gradients(model, 10.0)
        second_request = threading.Thread(target=averager.step, kwargs=dict(second, wait_for_delayed_updates=False))
        second_request.start()
        time.sleep(0.5)  # (a request that does not wait for the queued step has changed the buffers by now)
        release.set()
        second_request.join(30)
        assert not second_request.is_alive()
        for pending in averager.pending_updates:
            pending.result(30)
        averager.step()
        assert torch.allclose(model.weight, torch.full_like(model.weight, expected_weight))
    finally:
        release.set()
        averager.shutdown()


@pytest.mark.timeout(90)
def test_load_state_from_peers_under_the_lock_raises_at_once_and_downloads_once_it_is_released(dht_pair):
    # a download checks donors against this peer's own state, read by another thread under the lock: under it, that
    # read waited for the whole timeout, then the download failed with a TimeoutError blaming a slow get_current_state
    donor_model, donor = sgd_averager(dht_pair[0], "lock_download")
    model, newcomer = sgd_averager(dht_pair[1], "lock_download")
    try:
        donor.step(optimizer_step=True, increment_epoch=True)  # epoch 1, weights -0.1

        def download_under_the_lock():
            with newcomer.lock_optimizer:
                return newcomer.load_state_from_peers(timeout=30)

        started = time.monotonic()
        kind, error = in_a_thread(download_under_the_lock, timeout=60)
        assert kind == "raised" and isinstance(error, RuntimeError) and "lock_optimizer" in str(error), (kind, error)
        assert time.monotonic() - started < 15 and newcomer.local_epoch == 0
        assert newcomer.load_state_from_peers(timeout=30) is not None  # released: the download works
        assert newcomer.local_epoch == 1
        assert torch.allclose(model.weight, torch.full_like(model.weight, -0.1))
    finally:
        newcomer.shutdown()
        donor.shutdown()


@pytest.mark.timeout(60)
def test_several_steps_queued_without_waiting_each_use_their_own_gradients_and_free_their_copies(dht_pair):
    # each step queued behind an unfinished one holds a CPU copy of the model's gradients until it runs (one copy per
    # queued step, not one in all: see docs/optimizer.md); once they have run, no copy is left
    model, averager = sgd_averager(dht_pair[0], "lock_several_queued")
    release = threading.Event()
    try:
        averager.submit_background(release.wait, 30)  # the steps stay queued until this is released
        for value in (1.0, 10.0, 100.0):
            set_gradients(model, value)
            averager.step(optimizer_step=True, delay_optimizer_step=True, wait_for_delayed_updates=False)
        assert len(live_handovers()) == 2  # (the first step loaded the buffers: no step before it reads them)
        release.set()
        averager.step(wait_for_delayed_updates=True)
        assert torch.allclose(model.weight, torch.full_like(model.weight, -0.1 * 111.0))
        assert live_handovers() == []
    finally:
        release.set()
        averager.shutdown()


def live_handovers():
    gc.collect()
    return [item for item in gc.get_objects() if isinstance(item, GradientHandover)]
