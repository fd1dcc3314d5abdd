"""With delay_grad_averaging, the state average of one epoch is applied at the next epoch's end, not dropped."""

import threading

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, wait_for

__all__ = ["dht_pair"]  # the fixture, used below


@pytest.mark.timeout(60)
def test_each_epochs_state_average_reaches_the_parameters_with_background_gradient_averaging(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    with torch.no_grad():
        models[1].weight.add_(1.0)  # the peers start apart; with lr=0 only state averaging can bring them together
    options = dict(target_batch_size=8, batch_size_per_step=8, delay_grad_averaging=True,
                   optimizer=lambda params: torch.optim.SGD(params, lr=0.0))  # fmt: skip
    opts = [make_optimizer(dht, model, "delayed_state_rounds", **options) for dht, model in zip(dht_pair, models)]
    barrier, errors = threading.Barrier(2, timeout=20), []

    def train(model, opt):  # each step is a whole epoch; both peers end each epoch together
        try:
            for _ in range(3):
                barrier.wait()
                opt.zero_grad()
                model(torch.randn(8, 4)).sum().backward()
                opt.step()
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        threads = [threading.Thread(target=train, args=pair) for pair in zip(models, opts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        assert not errors, errors
        assert [opt.local_epoch for opt in opts] == [3, 3]
        # the averages of epochs 1 and 2 were applied at the ends of epochs 1 and 2 (that of epoch 3 may be pending)
        for mine, theirs in zip(*(model.parameters() for model in models)):
            assert torch.equal(mine, theirs)
    finally:
        for opt in opts:
            opt.shutdown()
