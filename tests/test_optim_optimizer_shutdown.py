"""hivemind.Optimizer after shutdown(): a step is refused with an error that says what happened, at once."""

import os
import signal
import threading
import time

import pytest
import torch
from optim_swarm_helpers import make_optimizer, wait_for

from hivemind.dht import DHT


@pytest.mark.timeout(60)
def test_step_after_shutdown_raises_a_clear_error_at_once():
    dht = DHT(start=True)
    try:
        model = torch.nn.Linear(2, 1)
        opt = make_optimizer(
            dht, model, "after_shutdown", target_batch_size=100, batch_size_per_step=2, averaging_timeout=3.0
        )
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        opt.shutdown()
        before = [param.detach().clone() for param in model.parameters()]
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="shut down"):
            opt.step()
        assert time.monotonic() - started < 1.0
        assert all(torch.equal(old, new) for old, new in zip(before, model.parameters()))
    finally:
        dht.shutdown()


@pytest.mark.timeout(60)
def test_load_state_from_peers_after_shutdown_raises_a_clear_error_at_once():
    dht = DHT(start=True)
    try:
        model = torch.nn.Linear(2, 1)
        opt = make_optimizer(dht, model, "load_after_shutdown", load_state_timeout=30.0)
        opt.shutdown()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="shut down"):
            opt.load_state_from_peers()
        assert time.monotonic() - started < 1.0
    finally:
        dht.shutdown()


@pytest.mark.timeout(60)
def test_a_dead_averager_process_fails_load_state_from_peers_at_once_instead_of_retrying_until_its_timeout():
    dht = DHT(start=True)
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(dht, model, "dead_averager", load_state_timeout=30.0)
    try:
        os.kill(opt.state_averager.pid, signal.SIGKILL)
        opt.state_averager.join(10)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="averager process .*killed by signal SIGKILL"):
            opt.load_state_from_peers()
        assert time.monotonic() - started < 5.0
        assert opt.local_epoch == 0
    finally:
        opt.shutdown()
        dht.shutdown()


@pytest.mark.timeout(90)
def test_shutdown_during_a_state_download_ends_the_download_at_once():
    donor_dht = DHT(start=True)
    newcomer_dht = DHT(initial_peers=donor_dht.get_visible_maddrs(), start=True)
    donor_model, newcomer_model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    donor = make_optimizer(donor_dht, donor_model, "shutdown_mid_download")
    newcomer = make_optimizer(newcomer_dht, newcomer_model, "shutdown_mid_download", load_state_timeout=60.0)
    serving, outcome = threading.Event(), {}
    original_get_current_state = donor.state_averager.get_current_state

    def slow_get_current_state():
        serving.set()
        time.sleep(15)  # a donor slow to prepare its state (a large model)
        return original_get_current_state()

    donor.state_averager.get_current_state = slow_get_current_state

    def download():
        try:
            newcomer.load_state_from_peers()
            outcome["result"] = "returned"
        except Exception as e:
            outcome["result"] = e
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=download)
    try:
        wait_for(lambda: newcomer_dht.get("shutdown_mid_download_state_averager.all_averagers") is not None)
        thread.start()
        assert serving.wait(30), "the newcomer never asked the donor"
        shutdown_at = time.monotonic()
        newcomer.shutdown()
        thread.join(30)
        assert not thread.is_alive() and outcome["ended"] - shutdown_at < 10.0, outcome
        assert isinstance(outcome["result"], RuntimeError), outcome  # says that the averager was shut down
    finally:
        thread.join(30)
        newcomer.shutdown()
        donor.shutdown()
        newcomer_dht.shutdown()
        donor_dht.shutdown()


@pytest.mark.timeout(60)
def test_an_optimizer_used_as_a_context_manager_is_shut_down_on_exit_also_after_an_error():
    dht = DHT(start=True)
    try:
        model = torch.nn.Linear(2, 1)
        with pytest.raises(KeyError):
            with make_optimizer(dht, model, "context_manager", target_batch_size=100) as opt:
                model(torch.ones(1, 2)).sum().backward()
                opt.step(batch_size=2)
                raise KeyError("the training loop failed")
        with pytest.raises(RuntimeError, match="shut down"):
            opt.step(batch_size=2)
        assert not opt.tracker.is_alive() and not opt.state_averager.is_alive()
    finally:
        dht.shutdown()
