"""hivemind.Optimizer after shutdown(): a step is refused with an error that says what happened, at once."""

import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer


@pytest.mark.timeout(60)
def test_step_after_shutdown_raises_a_clear_error_at_once():
    dht = DHT(start=True)
    try:
        model = torch.nn.Linear(2, 1)
        opt = Optimizer(
            dht=dht, run_id="after_shutdown", target_batch_size=100, batch_size_per_step=2,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
            matchmaking_time=1.0, averaging_timeout=3.0,
        )  # fmt: skip
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        opt.shutdown()
        before = [param.detach().clone() for param in model.parameters()]
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="shut down"):
            opt.step()
        assert time.monotonic() - started < 1.0
        assert all(torch.equal(old, new) for old, new in zip(before, model.parameters()))
    finally:
        dht.shutdown()
