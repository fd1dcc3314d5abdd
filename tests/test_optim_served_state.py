"""A donor serves the parameters that go with the epoch it announces, also while that epoch's step is pending."""

import pytest
import torch
from averager_helpers import dht_swarm
from optim_swarm_helpers import make_optimizer, mse_step, wait_for


@pytest.mark.timeout(60)
def test_a_newcomer_downloading_while_the_donors_background_step_waits_for_averaging_gets_that_steps_result():
    torch.manual_seed(0)
    models = [torch.nn.Linear(2, 1) for _ in range(2)]
    options = dict(target_batch_size=4, delay_grad_averaging=True, matchmaking_time=1.0, averaging_timeout=2.0)
    with dht_swarm(2) as dhts:
        opts = [make_optimizer(dht, model, "served_state", **options) for dht, model in zip(dhts, models)]
        donor, newcomer = opts
        try:
            wait_for(lambda: donor.tracker.global_progress.num_peers == 2)
            mse_step(models[0], donor, torch.randn(4, 2), torch.randn(4, 1))
            # the epoch ended; the other peer is expected but does not average, so the donor's background gradient
            # round waits out its matchmaking before its optimizer step runs; meanwhile the donor is at epoch 1
            assert donor.local_epoch == 1
            newcomer.load_state_from_peers()
            assert newcomer.local_epoch == 1
            donor.state_averager.wait_for_background_step()
            donor.state_averager.step()  # the donor's model gets its epoch-0 step
            for mine, theirs in zip(models[1].parameters(), models[0].parameters()):
                assert torch.equal(mine, theirs)
        finally:
            for opt in opts:
                opt.shutdown()
