"""A peer whose gradients of an epoch are inf/NaN (no GradScaler) drops them instead of poisoning its parameters."""

import threading
import time

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, wait_for

__all__ = ["dht_pair"]  # the fixture, used below


@pytest.mark.timeout(60)
def test_a_peer_with_nan_gradients_steps_with_the_others_average_and_keeps_finite_parameters(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    models[1].load_state_dict(models[0].state_dict())
    initial = [param.detach().clone() for param in models[0].parameters()]
    opts = [make_optimizer(dht, model, "nan_gradients") for dht, model in zip(dht_pair, models)]  # 2 x 4 = 8 samples
    barrier, errors = threading.Barrier(2, timeout=20), []
    x, y = torch.randn(4, 4), torch.randn(4, 1)

    def train(index: int):  # the same batch every step; the second peer's first backward gives NaN
        try:
            barrier.wait()
            for step in range(100):
                if opts[index].local_epoch >= 1:
                    break
                opts[index].zero_grad()
                loss = torch.nn.functional.mse_loss(models[index](x), y)
                (loss * float("nan") if (index, step) == (1, 0) else loss).backward()
                opts[index].step()
                time.sleep(0.02)
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        threads = [threading.Thread(target=train, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        assert not errors, errors
        assert [opt.local_epoch for opt in opts] == [1, 1]
    finally:
        for opt in opts:
            opt.shutdown()
    # both stepped with the first peer's gradient (the second one's counted for nothing): plain SGD on (x, y)
    reference = torch.nn.Linear(4, 1)
    with torch.no_grad():
        for param, value in zip(reference.parameters(), initial):
            param.copy_(value)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for model in models:
        for param, expected in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(param, expected, atol=1e-6)
