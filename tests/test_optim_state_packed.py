"""TrainingStateAverager.get_current_state copies the training state once, straight into one shared-memory block
(what the averager's process streams), and that copy is exact and does not follow later training."""

import pytest
import torch

from hivemind.dht import DHT
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state


@pytest.mark.timeout(60)
def test_current_state_is_one_exact_copy_in_a_single_shared_block():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    extra = torch.randn(5)
    dht = DHT(start=True)
    averager = TrainingStateAverager(
        dht=dht, prefix="packed_state", optimizer=lambda params: torch.optim.Adam(params, lr=0.1),
        params=model.parameters(), extra_tensors=[extra], start=True,
    )  # fmt: skip
    try:
        model(torch.randn(4, 6)).sum().backward()
        averager.step(optimizer_step=True)
        metadata, tensors, infos = averager.get_current_state()
        expected = [*averager.optimizer_parameters, extra]
        expected += dump_optimizer_state(averager.optimizer)[1]
        assert metadata["epoch"] == 0 and len(tensors) == len(infos) == 2 + 1 + 2 * 3
        for sent, original in zip(tensors, expected):
            assert torch.equal(sent, original) and not sent.requires_grad
        storage = tensors[0].untyped_storage().data_ptr()
        assert all(t.is_shared() and t.untyped_storage().data_ptr() == storage for t in tensors)
        before = [t.clone() for t in tensors]
        averager.step(optimizer_step=True)  # training goes on: the snapshot must not change
        assert all(torch.equal(t, b) for t, b in zip(tensors, before))
    finally:
        averager.shutdown()
        dht.shutdown()
