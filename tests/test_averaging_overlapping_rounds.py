"""Two steps of one averager whose all-reduces would overlap run one after the other: each round moves the tensors
from the values the previous one left (overlapping rounds would both move them from the same values)."""

import asyncio

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm, wait_for_stage

from hivemind.averaging.control import AveragingStage
from hivemind.averaging.round_turns import RoundTurns

SIZE = 2**20  # large enough that a round lasts longer than the averager's trigger polling period


def _local(averager):
    with averager.get_tensors() as tensors:
        return tensors[0].clone()


@pytest.mark.timeout(90)
def test_two_rounds_released_together_average_one_after_the_other():
    tensors = [[torch.zeros(SIZE)], [torch.full((SIZE,), 2.0)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2) as averagers:
        first = [averager.step(wait=False, require_trigger=True) for averager in averagers]
        wait_for_stage(first, AveragingStage.AWAITING_TRIGGER)
        second = [averager.step(wait=False, require_trigger=True) for averager in averagers]
        wait_for_stage(second, AveragingStage.AWAITING_TRIGGER)  # a second group of the same two peers
        for control in first + second:
            control.allow_allreduce()
        for control in first + second:
            control.result(timeout=60)
        for averager in averagers:
            assert torch.equal(_local(averager), torch.ones(SIZE))  # overlapping rounds: 2 and 0 (or a mix)


async def _is_blocked(waiting: asyncio.Task) -> bool:
    for _ in range(5):
        await asyncio.sleep(0)
    return not waiting.done()


@pytest.mark.timeout(10)
async def test_a_round_released_later_waits_for_the_running_one_and_earlier_formed_ones_go_first():
    turns = RoundTurns()
    first, second, third = turns.join(), turns.join(), turns.join()
    await turns.wait(second)  # at once: nothing runs, and nothing formed before it was released
    third_waits = asyncio.create_task(turns.wait(third))
    first_waits = asyncio.create_task(turns.wait(first))
    assert await _is_blocked(first_waits) and await _is_blocked(third_waits)  # the second one runs
    turns.leave(second)
    await asyncio.wait_for(first_waits, 1)  # formed before the third: it goes first
    assert await _is_blocked(third_waits)
    turns.leave(first)
    await asyncio.wait_for(third_waits, 1)
    turns.leave(third)


@pytest.mark.timeout(10)
async def test_a_round_still_waiting_for_its_trigger_holds_nobody_back():
    turns = RoundTurns()
    untriggered, later = turns.join(), turns.join()
    await turns.wait(later)  # at once
    turns.leave(later)
    turns.leave(untriggered)  # e.g. its step was cancelled before the trigger


@pytest.mark.timeout(10)
async def test_a_round_triggered_before_a_later_one_goes_first_even_before_its_task_noticed():
    turns = RoundTurns()
    first, second = turns.join(is_triggered=lambda: True), turns.join()
    second_waits = asyncio.create_task(turns.wait(second))
    assert await _is_blocked(second_waits)
    await turns.wait(first)
    turns.leave(first)
    await asyncio.wait_for(second_waits, 1)
    turns.leave(second)
