"""A whole peer (its averager, DHT process and p2pd daemon) frozen with SIGSTOP after its group formed, with no
timeouts given and no limit on the round (allreduce_timeout=math.inf, as hivemind.Optimizer(averaging_timeout=None)
sets): the others return within about one derived reducer timeout with the average of those who remained. (hivemind
1.1.12 with its default timeouts waits on: no result after 240 s.)"""

import math
import os
import signal
import time

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm, wait_for_stage
from freeze import freeze, freeze_tree, thaw_tree

from hivemind.averaging.control import AveragingStage

DERIVED_REDUCER_TIMEOUT = 10.0  # the loopback floors: 5 s per sender, 10 s per reducer


@pytest.mark.timeout(120)
def test_the_others_return_within_one_derived_deadline_when_a_whole_peer_freezes_in_their_group():
    size = 2**22  # 16 MiB per peer: 11 parts reduced by each
    values = (0.0, 3.0, 9.0)
    tensors = [[torch.full((size,), value)] for value in values]
    with (
        dht_swarm(3) as dhts,
        averagers_on(dhts, tensors, target_group_size=3, allreduce_timeout=math.inf) as averagers,
    ):
        controls = [averager.step(wait=False, require_trigger=True) for averager in averagers]
        wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)  # the group is formed
        try:
            freeze(averagers[2].pid)
            freeze_tree(dhts[2].pid)  # its DHT process and p2pd too: streams to it open, and stay silent
            started = time.monotonic()
            for control in controls[:2]:
                control.allow_allreduce()
            for control in controls[:2]:
                control.result(timeout=60)
            elapsed = time.monotonic() - started
            assert elapsed < DERIVED_REDUCER_TIMEOUT + 5.0, f"the others took {elapsed:.1f} s"
            survivors = sum(values[:2]) / 2
            for averager, own in zip(averagers[:2], values):
                with averager.get_tensors() as (result,):
                    averaged = torch.isclose(result, torch.tensor(survivors))
                    kept = torch.isclose(result, torch.tensor(own))  # the parts the frozen peer was to reduce
                    assert bool((averaged | kept).all())
                    assert size // 2 <= int(averaged.sum()) < size
        finally:
            os.kill(averagers[2].pid, signal.SIGKILL)
            thaw_tree(dhts[2].pid)
