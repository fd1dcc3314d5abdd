"""
A state round that waited past its epoch for the expected peers finds them only in their round of the next epoch:
the late peers (those whose round gathered an earlier epoch than others) average with weight 0 and refuse the
result (the others apply their own average, here unchanged values), and they are told so, so that the optimizer
skips their next round and the rounds of all peers start together again.
"""

import pytest
import torch
from averager_helpers import FAST, dht_swarm, state_rounds_together

from hivemind.optim.state_averager import TrainingStateAverager


@pytest.mark.timeout(60)
def test_a_refused_state_round_tells_only_the_peers_whose_epoch_was_behind():
    with dht_swarm(2) as dhts:
        models = [torch.nn.Linear(3, 1) for _ in dhts]
        averagers = [
            TrainingStateAverager(
                dht=dht,
                prefix="epoch_split_state_phase",
                optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                params=model.parameters(),
                target_group_size=2,
                start=True,
                **FAST,
            )
            for dht, model in zip(dhts, models)
        ]
        late, early = averagers
        late.local_epoch, early.local_epoch = 3, 4
        before = [[p.detach().clone() for p in m.parameters()] for m in models]
        try:
            state_rounds_together(averagers)
            assert (late.round_met_later_epochs, early.round_met_later_epochs) == (True, False)
            for model, params in zip(models, before):  # refused by the late one; the early one's own average
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        finally:
            for averager in averagers:
                averager.shutdown()
