"""hivemind.Optimizer(extra_tensors=...): tensors outside the model (e.g. running statistics) are averaged with the
parameters at epoch ends and handed to newcomers by load_state_from_peers."""

import pytest
import torch
from optim_swarm_helpers import make_optimizer, swarm, train_until_epoch, wait_for

__all__ = ["swarm"]  # the fixture, used by the tests below


@pytest.mark.timeout(90)
def test_extra_tensors_are_averaged_between_peers_and_downloaded_by_a_newcomer(swarm):
    first_dht, second_dht, newcomer_dht = swarm(3)
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    models = [torch.nn.Linear(8, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    # the extra tensors belong to the user: the optimizer updates them in place
    extras = [
        (torch.full((3,), 1.0), torch.tensor([[10.0, -4.0]])),
        (torch.full((3,), 3.0), torch.tensor([[0.0, 8.0]])),
    ]
    opts = [
        make_optimizer(dht, model, extra_tensors=peer_extras, delay_state_averaging=False)
        for dht, model, peer_extras in zip((first_dht, second_dht), models, extras)
    ]
    newcomer = None
    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        # two epochs: one successful state round suffices (a second round averages equal values)
        train_until_epoch(models, opts, 2, lambda index, epoch: (x, y))
        for vector, matrix in extras:
            assert torch.equal(vector, torch.full((3,), 2.0))
            assert torch.equal(matrix, torch.tensor([[5.0, 2.0]]))

        newcomer_model = torch.nn.Linear(8, 1)
        newcomer_extras = (torch.zeros(3), torch.zeros(1, 2))
        newcomer = make_optimizer(newcomer_dht, newcomer_model, extra_tensors=newcomer_extras)
        newcomer.load_state_from_peers()
        assert newcomer.local_epoch == 2
        assert torch.equal(newcomer_extras[0], torch.full((3,), 2.0))
        assert torch.equal(newcomer_extras[1], torch.tensor([[5.0, 2.0]]))
        for mine, theirs in zip(newcomer_model.parameters(), models[0].parameters()):
            assert torch.equal(mine, theirs)
    finally:
        for opt in opts + ([newcomer] if newcomer is not None else []):
            opt.shutdown()
