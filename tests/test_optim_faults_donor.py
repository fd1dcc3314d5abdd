"""Optimizer.load_state_from_peers when the best donor dies (SIGKILL) mid-download: the next donor's state is loaded
whole, and nothing of the partial download is applied."""

import contextlib
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from hivemind.averaging.state_sharing import StateSharing, all_averagers_key
from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer

FAST_TRACKER = dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1)
RUN_ID = "donor_killed"
DOOMED_PRIORITY = 1000.0  # above any epoch the honest donor reaches: the newcomer asks the doomed donor first


def make_optimizer(dht: DHT, model: torch.nn.Module, **averager_opts) -> Optimizer:
    return Optimizer(
        dht=dht, run_id=RUN_ID, target_batch_size=8, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.05), params=model.parameters(),
        matchmaking_time=0.5, averaging_timeout=2.0, load_state_timeout=30.0, tracker_opts=FAST_TRACKER,
        averager_opts=dict(request_timeout=0.3, **averager_opts),
    )  # fmt: skip


def doomed_donor(initial_peers, download_started: mp.Event) -> None:
    """A donor that sends the first message of its state, then dies with its whole process group."""
    os.setpgrp()
    original = StateSharing._state_messages

    async def send_some_then_die(self, context):
        async for message in original(self, context):
            yield message
            download_started.set()
            time.sleep(0.2)  # let the message leave
            os.killpg(os.getpgrp(), signal.SIGKILL)

    StateSharing._state_messages = send_some_then_die  # inherited by the averager's process: it is forked below
    dht = DHT(start=True, initial_peers=initial_peers)
    model = torch.nn.Linear(64, 64)  # its state needs several messages (64 KiB each)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(123.0)  # values that the newcomer must never end up with
    opt = make_optimizer(dht, model, start_method="fork")  # this process was spawned: its default is spawn
    opt.state_averager.state_sharing_priority = DOOMED_PRIORITY
    while True:
        time.sleep(1)


@pytest.mark.timeout(120)
def test_a_donor_killed_mid_download_is_skipped_and_its_partial_state_never_applied():
    honest_dht = DHT(start=True)
    newcomer_dht = DHT(initial_peers=honest_dht.get_visible_maddrs(), start=True)
    torch.manual_seed(0)
    honest_model, newcomer_model = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    honest = make_optimizer(honest_dht, honest_model)
    context = mp.get_context("spawn")
    download_started = context.Event()
    child = context.Process(target=doomed_donor, args=(honest_dht.get_visible_maddrs(), download_started))
    child.start()
    newcomer = None
    try:
        x = torch.randn(4, 64)
        while honest.local_epoch < 2:
            honest.zero_grad()
            torch.nn.functional.mse_loss(honest_model(x), x).backward()
            honest.step()
        deadline = time.monotonic() + 60
        while True:  # wait until the doomed donor has declared itself, with its higher priority
            declared = newcomer_dht.get(all_averagers_key(f"{RUN_ID}_state_averager"), latest=True)
            priorities = [entry.value for entry in declared.value.values()] if declared is not None else []
            if DOOMED_PRIORITY in priorities and len(priorities) == 2:
                break
            assert time.monotonic() < deadline and child.is_alive(), "the doomed donor did not declare itself"
            time.sleep(0.1)
        newcomer = make_optimizer(newcomer_dht, newcomer_model)
        newcomer.load_state_from_peers()
        assert download_started.is_set(), "the doomed donor was not asked first"
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        assert newcomer.local_epoch == honest.local_epoch == 2
        for mine, theirs in zip(newcomer_model.parameters(), honest_model.parameters()):
            assert torch.equal(mine, theirs)
        for mine, theirs in zip(newcomer.opt.state.values(), honest.opt.state.values()):
            assert torch.equal(mine["exp_avg"], theirs["exp_avg"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.join(10)
        if newcomer is not None:
            newcomer.shutdown()
        honest.shutdown()
        newcomer_dht.shutdown()
        honest_dht.shutdown()
