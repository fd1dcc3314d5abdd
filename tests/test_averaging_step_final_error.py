"""When every round of a step fails for one reason, the error the user gets names that reason, not only the
matchmaking deadline that ended the retries."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm

from hivemind.compression import PerTensorCompression


@pytest.mark.timeout(60)
def test_step_that_keeps_failing_in_the_allreduce_reports_the_last_real_failure():
    # no codec for tensor key 0: every round that forms a group fails locally while planning its parts
    tensors = [[torch.ones(8)], [torch.zeros(8)]]
    with (
        dht_swarm(2) as dhts,
        averagers_on(dhts, tensors, target_group_size=2, compression=PerTensorCompression([])) as averagers,
    ):
        controls = [averager.step(wait=False, timeout=4) for averager in averagers]
        for control in controls:
            with pytest.raises(Exception, match="has no compression for tensor key 0") as raised:
                control.result(timeout=30)
            assert "KeyError" in str(raised.value)
