"""hivemind.Optimizer(verbose=True) draws a tqdm bar of the swarm's samples toward the next epoch, with the number of
peers and the time left; verbose=False prints nothing."""

import re
import time

import pytest
import torch
from optim_swarm_helpers import make_optimizer, mse_step, swarm, wait_for

from hivemind.optim.epoch_rule import GlobalTrainingProgress
from hivemind.optim.progress_bar import EpochProgressBar
from hivemind.utils.timed_storage import get_dht_time

__all__ = ["swarm"]  # the fixture, used by the tests below

BAR_REFRESH_INTERVAL = 0.25  # the optimizer redraws the bar at most every 0.2 s
# each peer trains at most 4 samples per STEP_PERIOD (20/s): the 1000 samples are due in 20 s or more, so the epoch
# cannot end (by the ETA passing) during the test
STEP_PERIOD = 0.2


def last_bar(stderr: str, description: str) -> str:
    """The last state of the bar named ``description`` (tqdm redraws it in place, after a carriage return)."""
    drawn = [segment for segment in re.split(r"[\r\n]", stderr) if segment.startswith(description)]
    assert drawn, f"no progress bar {description!r} in {stderr!r}"
    return drawn[-1]


@pytest.mark.timeout(60)
def test_verbose_progress_bar_shows_swarm_samples_toward_the_target_peers_and_eta(swarm, capsys):
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    models = [torch.nn.Linear(8, 1) for _ in range(2)]
    verbose_dht, quiet_dht = swarm(2)
    verbose = make_optimizer(verbose_dht, models[0], target_batch_size=1000, verbose=True)
    quiet = make_optimizer(quiet_dht, models[1], target_batch_size=1000)
    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in (verbose, quiet)))
        for _ in range(2):  # two reports each: the second one measures the peer's speed
            mse_step(models[1], quiet, x, y)
            mse_step(models[0], verbose, x, y)
            time.sleep(STEP_PERIOD)
        wait_for(lambda: verbose.tracker.global_progress.samples_accumulated == 16)  # the other peer's 8 arrived
        time.sleep(BAR_REFRESH_INTERVAL)
        mse_step(models[0], verbose, x, y)
        bar = last_bar(capsys.readouterr().err, "test_run epoch 0")
    finally:
        verbose.shutdown()
        quiet.shutdown()
    assert "20/1000" in bar, bar  # 12 samples of this peer and 8 of the other, toward the target of 1000
    assert "peers=2" in bar, bar
    eta = re.search(r"eta=(\d+\.\d)s", bar)
    assert eta is not None, bar
    assert 0 < float(eta.group(1)) < 1000


@pytest.mark.timeout(60)
def test_quiet_optimizer_prints_no_progress_bar(swarm, capsys):
    (dht,) = swarm(1)
    model = torch.nn.Linear(8, 1)
    opt = make_optimizer(dht, model, target_batch_size=1000)
    try:
        for _ in range(3):
            mse_step(model, opt, torch.randn(4, 8), torch.randn(4, 1))
            time.sleep(BAR_REFRESH_INTERVAL)
        assert opt.tracker.local_progress.samples_accumulated == 12
    finally:
        opt.shutdown()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_shows_an_unknown_eta_as_a_question_mark(capsys):
    bar = EpochProgressBar("some_run", enabled=True)
    now = get_dht_time()
    bar.update(GlobalTrainingProgress(3, 40, 100, 1, 0, float("inf"), now + 1), local_epoch=3)
    bar.update(GlobalTrainingProgress(3, 70, 100, 2, 0, now + 30, now + 1), local_epoch=3)
    drawn = capsys.readouterr().err
    bar.close()
    *_, first, second = [segment for segment in re.split(r"[\r\n]", drawn) if segment.startswith("some_run epoch 3")]
    assert "40/100" in first and "peers=1" in first and "eta=?" in first
    assert "70/100" in second and "peers=2" in second and re.search(r"eta=(29|30)\.\ds", second)


def test_disabled_progress_bar_draws_nothing(capsys):
    bar = EpochProgressBar("some_run", enabled=False)
    bar.update(GlobalTrainingProgress(0, 40, 100, 2, 0, get_dht_time() + 5, get_dht_time() + 1), local_epoch=0)
    bar.close()
    assert capsys.readouterr().err == ""
