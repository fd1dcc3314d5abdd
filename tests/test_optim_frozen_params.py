"""hivemind.Optimizer leaves parameters that do not require grad as they are, like the torch optimizer it wraps."""

import copy

import pytest
import torch
from optim_swarm_helpers import make_optimizer

from hivemind.dht import DHT
from hivemind.optim.optimizer_state import initialize_optimizer_state_


def _model_with_frozen_first_layer() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    return model


@pytest.mark.timeout(30)
@pytest.mark.parametrize("offload_optimizer", [True, False], ids=["offloaded", "in-place"])
def test_a_global_step_with_adamw_matches_torch_and_keeps_frozen_parameters(offload_optimizer):
    model, batch = _model_with_frozen_first_layer(), (torch.randn(4, 4), torch.randn(4, 1))
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.5)
    initialize_optimizer_state_(reference_opt)  # as hivemind.Optimizer (and 1.1.12) does: Adam's step counter is 1
    torch.nn.functional.mse_loss(reference(batch[0]), batch[1]).backward()
    reference_opt.step()

    def adamw(params):
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)

    options = dict(optimizer=adamw, params=model.parameters())
    if not offload_optimizer:  # a built optimizer is used in place (no CPU copies of the parameters)
        options = dict(optimizer=adamw(model.parameters()), params=None)
    dht = DHT(start=True)
    opt = make_optimizer(dht, model, "frozen_params", target_batch_size=4, batch_size_per_step=4, **options)
    try:
        assert opt.offload_optimizer == offload_optimizer
        torch.nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
        opt.step()  # alone with the whole target batch: one global step
        assert opt.local_epoch == 1
    finally:
        opt.shutdown()
        dht.shutdown()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(param, expected, atol=1e-6), name
