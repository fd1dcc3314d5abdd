"""initialize_optimizer_state_ leaves statistics derived from the learning rate as 1.1.12's zero-gradient step does.

1.1.12 creates the statistics with a step of zero gradients at the optimizer's own learning rate; the statistics that
step derives from the learning rate (Rprop's step sizes, ASGD's eta) must be the same here, or the first steps of
peers of the two libraries differ (a step taken at a zero learning rate left Rprop's step sizes at their minimum,
1e-6, and made ASGD's first step zero).
"""

import pytest
import torch

from hivemind.optim.optimizer_state import initialize_optimizer_state_

pytestmark = pytest.mark.timeout(30)


def test_rprop_first_step_after_initialization_moves_by_the_learning_rate():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.Rprop([param], lr=0.1)
    initialize_optimizer_state_(opt)
    assert torch.equal(param.detach(), torch.tensor([1.0, -2.0, 3.0])) and param.grad is None
    torch.testing.assert_close(opt.state[param]["step_size"], torch.full((3,), 0.1))
    param.grad = torch.tensor([0.5, -4.0, 1e-3])
    opt.step()
    torch.testing.assert_close(param.detach(), torch.tensor([0.9, -1.9, 2.9]))


def test_asgd_first_step_after_initialization_moves_the_parameters():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.ASGD([param], lr=0.1)
    reference = torch.nn.Parameter(param.detach().clone())
    reference_opt = torch.optim.ASGD([reference], lr=0.1)
    reference.grad = torch.zeros_like(reference)  # 1.1.12's zero-gradient step (then the parameters are put back)
    reference_opt.step()
    with torch.no_grad():
        reference.copy_(param)
    initialize_optimizer_state_(opt)
    assert torch.equal(param.detach(), reference.detach()) and param.grad is None
    for tensor, optimizer in ((param, opt), (reference, reference_opt)):
        tensor.grad = torch.tensor([0.5, -4.0, 1.0])
        optimizer.step()
    assert (param.detach() - torch.tensor([1.0, -2.0, 3.0])).abs().min() > 0.04  # a step of about lr * grad
    torch.testing.assert_close(param.detach(), reference.detach())


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_a_weight_decay_of_the_initialization_step_is_undone(optimizer):
    """1.1.12 keeps the weight decay of its zero-gradient step (parameters shrink by lr * weight_decay at
    construction); ours puts the parameters back, as they were given."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    kwargs = dict(momentum=0.9) if optimizer == "SGD" else {}
    opt = getattr(torch.optim, optimizer)([param], lr=0.1, weight_decay=0.5, **kwargs)
    initialize_optimizer_state_(opt)
    assert torch.equal(param.detach(), torch.tensor([1.0, -2.0, 3.0])) and param.grad is None
    assert opt.param_groups[0]["lr"] == 0.1
