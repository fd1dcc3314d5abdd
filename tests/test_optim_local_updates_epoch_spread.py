"""With use_local_updates, epochs end at each peer's own pace, so a state round often joins members one epoch apart:
hivemind.Optimizer has them average as equals (``max_epoch_spread`` 1), also when a subclass builds the state averager
itself with the arguments hivemind 1.1.12's Optimizer uses (as OpenDiLoCo's DiLoCoOptimizer does), which say nothing
of an epoch spread. Before, the member one epoch behind averaged with weight 0 and kept its own parameters while the
other applied its own: two such peers never averaged at all (1.1.12 averages all members as equals)."""

import pytest
import torch
from averager_helpers import state_rounds_together
from optim_swarm_helpers import StateAveragerOf1_1_12, dht_pair, make_optimizer

from hivemind.optim.optimizer import Optimizer

__all__ = ["dht_pair"]  # the fixture, used below


CASES = dict(
    base=dict(optimizer_class=Optimizer),
    own_state_averager=dict(optimizer_class=StateAveragerOf1_1_12),
    own_spawned_state_averager=dict(
        optimizer_class=StateAveragerOf1_1_12, averager_opts=dict(request_timeout=0.5, start_method="spawn")
    ),  # (the averager's process, started before the Optimizer sets the spread, follows it)
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_members_one_epoch_apart_average_as_equals_with_local_updates(dht_pair, case):
    models = [torch.nn.Linear(2, 1) for _ in dht_pair]
    opts = []
    try:
        for dht, model in zip(dht_pair, models):
            opts.append(make_optimizer(dht, model, f"spread_{case}", use_local_updates=True, **CASES[case]))
        for opt, model, epoch, value in zip(opts, models, (4, 3), (1.0, 3.0)):
            with torch.no_grad():
                for param in model.parameters():
                    param.fill_(value)
            opt.state_averager.local_epoch = epoch
        assert [opt.state_averager.max_epoch_spread for opt in opts] == [1, 1]
        state_rounds_together([opt.state_averager for opt in opts])
        for model in models:  # both apply the mean (before: the peer ahead kept 1.0, the one behind 3.0)
            assert {x for param in model.parameters() for x in param.flatten().tolist()} == {2.0}
    finally:
        for opt in opts:
            opt.shutdown()
