"""Review of output reuse (h1) through DecentralizedAverager: consecutive steps with tensors large enough for the
averager to write each round's deltas into the memory of the last round's."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm, weighted_mean

LARGE = 2**19  # 2 MiB of float32: above the size from which outputs are reused


@pytest.mark.timeout(120)
def test_consecutive_steps_with_reused_outputs_stay_exact_with_weights_and_alpha():
    """Three steps with weights, averaging_alpha=0.5 and local changes between them: each step moves every peer
    exactly half-way to the weighted average of that step's values (stale deltas of the last step would show)."""
    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    tensors = [
        [torch.randn(LARGE, generator=g), torch.randn(LARGE // 4, dtype=torch.float64, generator=g)]
        for g in generators
    ]
    weights = [1.0, 3.0, 0.5]
    with dht_swarm(3) as dhts, averagers_on(dhts, tensors, target_group_size=3, averaging_alpha=0.5) as averagers:
        for step in range(3):
            before = []
            for index, averager in enumerate(averagers):
                with averager.get_tensors() as local:
                    if step > 0:  # each peer changes its values between steps
                        for tensor in local:
                            tensor.mul_(-1.0 - index).add_(step)
                    before.append([tensor.clone() for tensor in local])
            controls = [averager.step(wait=False, weight=weight) for averager, weight in zip(averagers, weights)]
            for control in controls:
                control.result(timeout=60)
            targets = [weighted_mean([peer[k].double() for peer in before], weights) for k in range(2)]
            for averager, own in zip(averagers, before):
                with averager.get_tensors() as local:
                    for tensor, start, target in zip(local, own, targets):
                        expected = start.double() + 0.5 * (target - start.double())
                        assert torch.allclose(tensor.double(), expected, rtol=0, atol=1e-5), step
