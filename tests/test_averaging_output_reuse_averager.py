"""Output reuse through DecentralizedAverager: consecutive steps with tensors large enough for the
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


@pytest.mark.timeout(60)
def test_a_raw_parameter_before_a_float16_gradient_is_averaged_too():
    """Roles choose the codec per tensor (parameters raw, gradients in float16); the vector is cut so that one
    reducer gets the end of the parameter and the start of the gradient."""
    from hivemind.compression import CompressionInfo, Float16Compression, RoleAdaptiveCompression, TensorRole

    generator = torch.Generator().manual_seed(0)
    tensors = [
        [torch.randn(300_000, generator=generator), torch.randn(600_000, generator=generator)] for _ in range(2)
    ]
    expected = [(a + b) / 2 for a, b in zip(*tensors)]
    roles = (TensorRole.PARAMETER, TensorRole.GRADIENT)
    compression = RoleAdaptiveCompression(gradient=Float16Compression())  # other roles: no compression
    infos = [
        [CompressionInfo.from_tensor(t, key=i, role=r) for i, (t, r) in enumerate(zip(own, roles))] for own in tensors
    ]
    with (
        dht_swarm(2) as dhts,
        averagers_on(
            dhts, tensors, prefix="review_roles", target_group_size=2, compression=compression, tensor_infos=infos
        ) as averagers,
    ):
        for control in [averager.step(wait=False) for averager in averagers]:
            control.result(timeout=60)
        for averager in averagers:
            with averager.get_tensors() as (parameter, gradient):
                assert (parameter - expected[0]).abs().max().item() < 1e-6
                assert (gradient - expected[1]).abs().max().item() < 1e-2
