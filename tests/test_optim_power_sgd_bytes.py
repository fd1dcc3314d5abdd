"""PowerSGD gradient averaging sends far fewer bytes than plain gradient averaging of the same model, and still trains.

The bytes are measured where they leave the peer: each peer's p2pd daemon carries all of its traffic (DHT, progress
records, matchmaking, all-reduce), and the kernel counts what the daemon writes (``/proc/<pid>/io``, ``wchar``: its
TCP connections to other peers and its sockets to local clients).
"""

import functools
import logging
from typing import List

import psutil
import pytest
import torch
from optim_swarm_helpers import make_optimizer, swarm, train_until_epoch, wait_for

from hivemind.dht import DHT
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

__all__ = ["swarm"]  # the fixture, used by the tests below

WIDTH, RANK, EPOCHS = 512, 4, 5
GRADIENT_BYTES = WIDTH * WIDTH * 4  # one float32 weight matrix, no bias


def bytes_written_by_daemons(dhts: List[DHT]) -> List[int]:
    counts = []
    for dht in dhts:
        daemons = [child for child in psutil.Process(dht.pid).children(recursive=True) if child.name() == "p2pd"]
        assert daemons, f"no p2pd under the DHT process {dht.pid}"
        counts.append(sum(daemon.io_counters().write_chars for daemon in daemons))
    return counts


class _RoundCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.rounds = 0

    def emit(self, record):
        self.rounds += "averaged gradients with 2 peers" in record.getMessage()


def train_and_measure(dhts: List[DHT], run_id: str, **options):
    """Two peers train a WIDTH x WIDTH linear map for EPOCHS epochs; returns (bytes each daemon wrote meanwhile,
    successful gradient rounds, initial loss, final losses)."""
    torch.manual_seed(0)
    # inputs in a 4-dimensional subspace: a well-conditioned problem that a few epochs of SGD solve
    basis = torch.linalg.qr(torch.randn(WIDTH, 4))[0].T
    features = torch.randn(512, 4) @ basis
    targets = features @ torch.randn(WIDTH, WIDTH)
    models = [torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in dhts]
    for model in models:
        torch.nn.init.zeros_(model.weight)

    def loss(model):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(features), targets).item()

    generators = [torch.Generator().manual_seed(index) for index in range(len(dhts))]

    def batch(index, epoch):
        rows = torch.randint(0, len(features), (8,), generator=generators[index])
        return features[rows], targets[rows]

    # lr ~ WIDTH: mse_loss averages over the WIDTH outputs. No parameter averaging: only gradients are exchanged
    opts = [
        make_optimizer(
            dht, model, run_id=run_id, target_batch_size=32, batch_size_per_step=8, average_state_every=1000,
            optimizer=lambda params: torch.optim.SGD(params, lr=WIDTH / 4), **options,
        )
        for dht, model in zip(dhts, models)
    ]  # fmt: skip
    counter = _RoundCounter()
    optimizer_logger = logging.getLogger("hivemind.optim.optimizer")
    old_level = optimizer_logger.level
    optimizer_logger.addHandler(counter)
    optimizer_logger.setLevel(logging.DEBUG)
    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        before = bytes_written_by_daemons(dhts)
        train_until_epoch(models, opts, EPOCHS, batch)
        written = [after - start for after, start in zip(bytes_written_by_daemons(dhts), before)]
    finally:
        optimizer_logger.removeHandler(counter)
        optimizer_logger.setLevel(old_level)
        for opt in opts:
            opt.shutdown()
    initial_loss = targets.pow(2).mean().item()  # of the zero-initialized models
    return written, counter.rounds, initial_loss, [loss(model) for model in models]


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(psutil.Process().io_counters(), "write_chars"), reason="needs Linux /proc/<pid>/io")
def test_power_sgd_sends_far_fewer_bytes_than_plain_averaging_and_still_converges(swarm):
    dhts = swarm(2)
    plain_bytes, plain_rounds, initial_loss, plain_losses = train_and_measure(dhts, "plain_run")
    factory = functools.partial(PowerSGDGradientAverager, averager_rank=RANK)
    power_bytes, power_rounds, _, power_losses = train_and_measure(dhts, "power_run", grad_averager_factory=factory)

    # a peer sends half of its gradient to the other reducer and returns the average of the half it reduces
    assert plain_rounds >= 2 and power_rounds >= 2  # rounds of both peers together
    for written in plain_bytes:
        assert written >= 0.95 * GRADIENT_BYTES * plain_rounds / 2
    # rank-4 factors of a 512 x 512 gradient are 64x smaller; progress records and matchmaking stay the same
    for plain, power in zip(plain_bytes, power_bytes):
        assert power / power_rounds < 0.2 * plain / plain_rounds
    for loss in plain_losses + power_losses:
        assert loss < 0.1 * initial_loss
