"""The LR scheduler follows the epoch, and an epoch far ahead (a faulty peer's claim) cannot hang a step."""

import torch

from hivemind.optim.state_averager import catch_up_scheduler


def make_scheduler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def test_scheduler_catches_up_to_the_epoch_exactly():
    scheduler = make_scheduler()
    catch_up_scheduler(scheduler, 3)
    assert scheduler.last_epoch == 3
    assert scheduler.optimizer.param_groups[0]["lr"] == 0.125
    catch_up_scheduler(scheduler, 2)  # never goes back
    assert scheduler.last_epoch == 3


def test_an_absurd_epoch_is_approached_in_bounded_chunks():
    scheduler = make_scheduler()
    catch_up_scheduler(scheduler, 10**18, max_steps=1000)
    assert scheduler.last_epoch == 1000


def test_no_scheduler_is_fine():
    catch_up_scheduler(None, 5)


def test_catching_up_a_fresh_scheduler_raises_no_torch_ordering_warning():
    import warnings

    import torch

    from hivemind.optim.scheduler_sync import catch_up_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        catch_up_scheduler(scheduler, 3)
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == 0.125
