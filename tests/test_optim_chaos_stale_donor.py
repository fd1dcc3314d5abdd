"""A peer that is itself downloading the state does not serve its stale state to a newcomer.

Found by benchmarks/chaos_optimizer.py: a trainer thawed after a SIGSTOP was far behind and downloading the state,
while the up-to-date donor's state was not ready (its delayed optimizer step was waiting for a gradient round). A
newcomer asked the up-to-date donor first and, when it did not start within request_timeout, the stale peer too,
which answered at once: the newcomer started 14 epochs behind the swarm and had to download again at every step.
"""

import threading

import pytest
import torch
from averager_helpers import dht_swarm
from optim_swarm_helpers import make_optimizer, mse_step, wait_for

from hivemind.averaging.state_sharing import all_averagers_key

READY_AFTER = 3.0  # seconds during which the up-to-date donor's state is not ready (a step still running)


@pytest.mark.timeout(60)
def test_a_newcomer_waits_for_the_up_to_date_donor_instead_of_a_peer_that_is_downloading():
    with dht_swarm(3) as dhts:
        run_newcomer_beside_a_downloading_laggard(dhts)


def run_newcomer_beside_a_downloading_laggard(dhts) -> None:
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 1) for _ in range(3)]
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    donor = make_optimizer(dhts[0], models[0], load_state_timeout=30.0)
    laggard = newcomer = None
    try:
        while donor.local_epoch < 3:
            mse_step(models[0], donor, x, y)
        asked = threading.Event()
        serve = donor.state_averager.get_current_state

        def slow_get_current_state():  # as while the donor's delayed optimizer step of its last epoch runs
            asked.set()
            return serve()

        donor.state_averager.get_current_state = slow_get_current_state
        donor.state_averager._state_ready.clear()
        threading.Timer(READY_AFTER, donor.state_averager._state_ready.set).start()

        laggard = make_optimizer(dhts[1], models[1], load_state_timeout=30.0)
        laggard_thread = threading.Thread(target=laggard.load_state_from_peers)
        laggard_thread.start()
        assert asked.wait(10), "the laggard did not ask the up-to-date donor"
        wait_for(lambda: newcomer_sees_two_donors(dhts[2]), timeout=10)

        newcomer = make_optimizer(dhts[2], models[2], load_state_timeout=30.0)
        newcomer.load_state_from_peers()
        laggard_thread.join(30)
        assert newcomer.local_epoch == donor.local_epoch == 3
        assert torch.equal(models[2].weight, models[0].weight)
        assert laggard.local_epoch == 3
    finally:
        for opt in (donor, laggard, newcomer):
            if opt is not None:
                opt.shutdown()


def newcomer_sees_two_donors(dht) -> bool:
    """Whether the donor and the laggard have both declared that they share the state (priorities 3 and 0)."""
    found = dht.get(all_averagers_key("test_run_state_averager"), latest=True)
    return found is not None and len(found.value) >= 2
