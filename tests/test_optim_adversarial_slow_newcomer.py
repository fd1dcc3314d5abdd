"""Epochs that start early can be shorter than a peer's step. A newcomer with such slow steps downloads the state,
and by its next step the swarm has moved on: the others must still expect it (it reported the epoch it caught up
to after they had left it), or it downloads the state over and over and never averages (starves)."""

import threading
import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer

FAST_TRACKER = dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1)
FAST_STEP, SLOW_STEP = 0.01, 0.25  # seconds between steps; the fast peers alone end an epoch in ~0.2 s
ROUNDS_GIVEN = 16  # epochs of the fast peers in which the newcomer must join a round (it did in none before)


def make_optimizer(dht, model):
    return Optimizer(
        dht=dht, run_id="slow_newcomer", target_batch_size=64, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
        matchmaking_time=3.0, averaging_timeout=6.0, tracker_opts=FAST_TRACKER,
        averager_opts=dict(request_timeout=1.0),
    )  # fmt: skip


def train(model, opt, period, stop, rounds, seed):
    generator = torch.Generator().manual_seed(seed)
    while not stop.is_set():
        epoch = opt.local_epoch
        x = torch.randn(4, 8, generator=generator)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True)).backward()
        opt.step()
        if opt.local_epoch != epoch:
            rounds.append(len(opt._last_round_peers or ()))  # 0: a state download or a failed round
        time.sleep(period)


@pytest.mark.timeout(90)
def test_a_newcomer_slower_than_an_epoch_joins_a_gradient_round_soon():
    first = DHT(start=True)
    dhts = [first] + [DHT(initial_peers=first.get_visible_maddrs(), start=True) for _ in range(2)]
    models = [torch.nn.Linear(8, 1) for _ in range(4)]
    opts = [make_optimizer(dht, model) for dht, model in zip(dhts, models)]
    stop, threads, rounds = threading.Event(), [], [[] for _ in range(4)]
    try:
        for i in range(3):
            threads.append(threading.Thread(target=train, args=(models[i], opts[i], FAST_STEP, stop, rounds[i], i)))
            threads[-1].start()
        deadline = time.monotonic() + 30
        while len(rounds[0]) < 3:  # the fast peers run short epochs without the newcomer
            assert time.monotonic() < deadline, "the fast peers did not start training"
            time.sleep(0.05)
        dhts.append(DHT(initial_peers=first.get_visible_maddrs(), start=True))
        opts.append(make_optimizer(dhts[-1], models[3]))
        joined_at = len(rounds[0])
        threads.append(threading.Thread(target=train, args=(models[3], opts[3], SLOW_STEP, stop, rounds[3], 3)))
        threads[-1].start()
        deadline = time.monotonic() + 40
        while 4 not in rounds[3] and len(rounds[0]) < joined_at + ROUNDS_GIVEN:
            assert time.monotonic() < deadline, f"no progress: {rounds}"
            time.sleep(0.05)
        assert 4 in rounds[3], f"the newcomer never averaged (its epoch changes: {rounds[3]}, the others' rounds: " \
            f"{rounds[0][joined_at:]})"  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for opt in opts:
            opt.shutdown()
        for dht in dhts:
            dht.shutdown()
