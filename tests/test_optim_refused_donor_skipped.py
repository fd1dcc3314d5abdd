"""A donor whose training state is refused (here: NaN parameters, declared with the highest priority) is skipped, and
the newcomer downloads the state of the next donor instead of ending up with none."""

import time

import pytest
import torch
from averager_helpers import dht_swarm

from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.state_loading import check_load_state_arguments


def make_averager(dht, prefix, model, **options):
    return TrainingStateAverager(
        dht=dht, prefix=prefix, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
        start=True, **options,
    )  # fmt: skip


def wait_for_donors(dht, prefix, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = dht.get(f"{prefix}.all_averagers", latest=True)
        if entries is not None and len(entries.value) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} donors did not declare their state under {prefix} within {timeout} s")


@pytest.mark.timeout(90)
def test_a_refused_donor_is_skipped_for_the_next_one():
    prefix = "refused_donor_skipped"
    good_model, bad_model, new_model = (torch.nn.Linear(3, 2) for _ in range(3))
    with torch.no_grad():
        for param in good_model.parameters():
            param.fill_(1.5)
        for param in bad_model.parameters():
            param.fill_(float("nan"))
    with dht_swarm(3) as dhts:
        averagers = []
        try:
            good = make_averager(dhts[0], prefix, good_model, declare_state_period=0.5)
            averagers.append(good)
            bad = make_averager(dhts[1], prefix, bad_model, declare_state_period=0.5)
            averagers.append(bad)
            newcomer = make_averager(dhts[2], prefix, new_model, allow_state_sharing=False)
            averagers.append(newcomer)
            good.local_epoch = bad.local_epoch = 4
            good.state_sharing_priority, bad.state_sharing_priority = 1.0, 10.0  # the bad donor is asked first
            wait_for_donors(dhts[2], prefix, 2)

            loaded = newcomer.load_state_from_peers(timeout=40)

            assert loaded is not None, "the good donor's state was not downloaded after the bad one was refused"
            assert newcomer.local_epoch == 4
            assert all(torch.equal(param, torch.full_like(param, 1.5)) for param in new_model.parameters())
        finally:
            for averager in averagers:
                averager.shutdown()


@pytest.mark.parametrize("kwargs", [dict(wait=False), dict(timeout=1.0, wait=0), dict(tiemout=3.0)])
def test_load_state_arguments_that_cannot_work_are_refused_at_once(kwargs):
    with pytest.raises(TypeError, match="load_state_from_peers"):
        check_load_state_arguments(kwargs)
