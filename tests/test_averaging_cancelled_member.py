"""A member that cancels its step after joining a group: the others finish at once, without it."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm, run_allreduce, wait_for_stage

from hivemind.averaging.control import AveragingStage

SIZE = 3000


@pytest.mark.timeout(90)
def test_members_finish_at_once_without_a_member_that_cancelled_after_joining():
    values = [torch.randn(SIZE) for _ in range(3)]
    tensors = [[value.clone()] for value in values]
    with dht_swarm(3) as dhts, averagers_on(dhts, tensors, target_group_size=3, part_size_bytes=4000) as averagers:
        controls = [averager.step(wait=False, require_trigger=True, timeout=60) for averager in averagers]
        wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)
        assert controls[2].cancel()
        elapsed = run_allreduce(controls[:2], timeout=30)
        # the cancelled member refuses the parts it would have reduced at once, and is excluded as a sender at once
        assert elapsed < 4.0, f"the others waited {elapsed:.1f} s for the member that cancelled"
        results = []
        for averager in averagers[:2]:
            with averager.get_tensors() as (tensor,):
                results.append(tensor.clone())
    mean = (values[0] + values[1]) / 2
    averaged = torch.isclose(results[0], mean, atol=1e-5)
    assert torch.equal(averaged, torch.isclose(results[1], mean, atol=1e-5))
    assert SIZE // 2 <= int(averaged.sum()) < SIZE  # the parts the two reduced; the third's keep local values
    for result, value in zip(results, values):
        torch.testing.assert_close(result[~averaged], value[~averaged], rtol=0, atol=0)
