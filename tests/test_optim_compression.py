"""hivemind.Optimizer's compression options: grad_compression, state_averaging_compression and load_state_compression
each change what arrives by exactly the codec's rounding (the same runs without compression are exact), and training
with all three still converges."""

import copy

import pytest
import torch
from optim_swarm_helpers import RegressionTask, donor_then_newcomer, joined_optimizers, swarm, train_until_epoch

from hivemind.compression import Float16Compression, Uniform8BitQuantization

FLOAT16_RELATIVE_ERROR = 2.0**-11  # round to nearest with a 10-bit mantissa
FLOAT32_NOISE = 1e-6  # reordered float32 sums in an exact all-reduce

__all__ = ["swarm"]  # the fixture, used by the tests below


def max_difference(first: torch.nn.Module, second: torch.nn.Module) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first.parameters(), second.parameters()))


@pytest.mark.timeout(90)
def test_grad_compression_rounds_the_averaged_gradients(swarm):
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    models = [torch.nn.Linear(16, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reference = copy.deepcopy(models[0])
    # both peers use the same batch, so the exact average is that batch's gradient whatever each peer's sample count
    options = dict(
        grad_compression=Float16Compression(), average_state_every=1000,  # no parameter averaging
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
    )  # fmt: skip
    with joined_optimizers(swarm(2), models, **options) as opts:
        train_until_epoch(models, opts, 1, lambda index, epoch: (x, y))

    torch.nn.functional.mse_loss(reference(x), y).backward()
    largest_gradient = max(p.grad.abs().max().item() for p in reference.parameters())
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    for model in models:
        # each peer's result mixes its own exact part with the other's float16 one: never exact, at most one rounding
        error = max_difference(model, reference)
        assert FLOAT32_NOISE < error <= 2 * FLOAT16_RELATIVE_ERROR * largest_gradient + FLOAT32_NOISE


@pytest.mark.timeout(90)
def test_state_averaging_compression_rounds_the_averaged_parameters(swarm):
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    models = [torch.nn.Linear(16, 4) for _ in range(2)]  # different initial parameters
    exact_mean = copy.deepcopy(models[0])
    with torch.no_grad():
        for mean, other in zip(exact_mean.parameters(), models[1].parameters()):
            mean.copy_((mean + other) / 2)
    # lr=0: only parameter averaging changes the parameters
    options = dict(
        state_averaging_compression=Float16Compression(), delay_state_averaging=False,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
    )  # fmt: skip
    with joined_optimizers(swarm(2), models, **options) as opts:
        # two epochs: one successful state round suffices (a second one averages nearly equal values)
        train_until_epoch(models, opts, 2, lambda index, epoch: (x, y))

    largest_parameter = max(p.abs().max().item() for p in exact_mean.parameters())
    for model in models:
        error = max_difference(model, exact_mean)
        assert FLOAT32_NOISE < error <= 4 * FLOAT16_RELATIVE_ERROR * largest_parameter + FLOAT32_NOISE


@pytest.mark.timeout(90)
def test_load_state_compression_rounds_the_downloaded_parameters(swarm):
    torch.manual_seed(0)
    batch = torch.randn(8, 64), torch.randn(8, 32)
    # more values than the codec's 256 bins: a bin's average no longer equals each of its values
    models = donor_model, newcomer_model = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    options = dict(load_state_compression=Uniform8BitQuantization())
    with donor_then_newcomer(swarm(2), models, 1, batch, **options) as (_, newcomer):
        assert newcomer.local_epoch == 1
        for mine, theirs in zip(newcomer_model.parameters(), donor_model.parameters()):
            # 256 equal bins over mean +- 3 std (a uniform initialization has no value outside): off by under one bin
            bin_width = 6 * theirs.std(unbiased=False).item() / 256
            assert (mine - theirs).abs().max().item() <= bin_width + FLOAT32_NOISE
        assert not torch.equal(newcomer_model.weight, donor_model.weight)


@pytest.mark.timeout(120)
def test_training_with_every_compression_option_still_converges(swarm):
    task = RegressionTask()
    compression = dict(
        grad_compression=Float16Compression(),
        state_averaging_compression=Uniform8BitQuantization(),
        load_state_compression=Uniform8BitQuantization(),
    )
    generators = [torch.Generator().manual_seed(index) for index in range(2)]
    with joined_optimizers(swarm(2), task.models, target_batch_size=32, **compression) as opts:
        train_until_epoch(task.models, opts, 6, lambda index, epoch: task.sample(generators[index]), timeout=90)
    for model in task.models:
        assert task.full_loss(model) < 0.25 * task.initial_loss
