"""Derived deadlines learn from rounds that cut a slow honest sender (real averagers, each in its own process, on
real p2pd peers on 127.0.0.1). A peer whose link carries its parts too slowly for the deadline derived from faster
rounds is cut at the round's last call; the next rounds' derived deadline is stretched to its observed pace (at most
twice per round), so that it is averaged again instead of being cut in every later round. The link is slowed either in
the slow peer's sending (its parts leave one by one) or at the far end (its parts wait in the streams' buffers, as the
few kilobytes of a small transfer do on a real slow link: the slow peer has handed all of them over within
milliseconds, and only the replies it did not get tell it that they were late)."""

import asyncio
import contextlib
from typing import Iterator

import pytest
import torch
from averager_helpers import FAST, dht_swarm, run_allreduce, wait_for_stage

from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.allreduce_reducer import ReducerSide
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.deadlines import AdaptiveDeadlines

SIZE, PART_BYTES = 2048, 256  # 32 parts of 64 float32 elements: 16 reduced by each of the two fast peers
# the derived deadlines of this vector are the floors; low floors keep the rounds short: a 4 s round, 1.5 s per part
FLOORS = dict(min_sender_timeout=1.5, min_allreduce_timeout=4.0)
# the slow peer's link carries one part every 0.16 s: its 32 parts take 5.1 s, 1.3 times the first round's deadline
# (each of its two streams moves one part every 0.32 s, well within the 1.5 s a reducer waits for the next part)
SECONDS_PER_PART = 0.16


@contextlib.contextmanager
def _slow_link_in_processes_started_here() -> Iterator[None]:
    """Averager processes forked inside send their parts over one slow link, shared by their streams to the
    reducers (this process runs no round itself; those started before or after send as usual)."""
    send_parts = AllReduceRunner._generate_input_for
    link = {"free_at": 0.0}

    async def over_the_slow_link(runner, peer_index, progress):
        async for message in send_parts(runner, peer_index, progress):
            loop = asyncio.get_running_loop()
            link["free_at"] = max(loop.time(), link["free_at"]) + SECONDS_PER_PART
            await asyncio.sleep(link["free_at"] - loop.time())
            yield message

    AllReduceRunner._generate_input_for = over_the_slow_link
    try:
        yield
    finally:
        AllReduceRunner._generate_input_for = send_parts


@contextlib.contextmanager
def _slow_reading_in_processes_started_here(slow_peer_id) -> Iterator[None]:
    """Averager processes forked inside take the parts of ``slow_peer_id`` from each of its two streams one per
    2 * SECONDS_PER_PART (its link, shared by both streams), after they waited in the streams' buffers."""
    read_parts = ReducerSide._read_parts

    async def over_the_slow_link(runner, sender_index, first, stream, queue):
        if runner.sender_peer_ids[sender_index] == slow_peer_id:
            stream = _one_by_one(stream, 2 * SECONDS_PER_PART)
        return await read_parts(runner, sender_index, first, stream, queue)

    ReducerSide._read_parts = over_the_slow_link
    try:
        yield
    finally:
        ReducerSide._read_parts = read_parts


async def _one_by_one(stream, seconds: float):
    async for message in stream:
        await asyncio.sleep(seconds)
        yield message


def _averager(tensor: torch.Tensor, dht, **options) -> DecentralizedAverager:
    averager = DecentralizedAverager(
        [tensor], dht, prefix="slowlink", start=False, target_group_size=3, min_group_size=3,
        part_size_bytes=PART_BYTES, **FAST, **options,
    )  # fmt: skip
    averager._deadlines = AdaptiveDeadlines(**FLOORS)  # no timeouts given: derived, with lower floors
    averager.run_in_background(await_ready=True, timeout=30)
    return averager


def _values(averager) -> torch.Tensor:
    with averager.get_tensors() as tensors:
        return tensors[0].clone()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("slow_end", ["sending", "buffered"])
def test_a_slow_honest_sender_cut_in_its_first_round_is_averaged_by_the_next(slow_end):
    with dht_swarm(3) as dhts:
        averagers = []
        try:
            buffered = slow_end == "buffered"
            with _slow_reading_in_processes_started_here(dhts[2].peer_id) if buffered else contextlib.nullcontext():
                averagers.append(_averager(torch.zeros(SIZE), dhts[0]))
                averagers.append(_averager(torch.zeros(SIZE), dhts[1]))
            # it reduces nothing (bandwidth 0): it only sends, and gets its replies at the end
            with contextlib.nullcontext() if buffered else _slow_link_in_processes_started_here():
                averagers.append(_averager(torch.full((SIZE,), 3.0), dhts[2], bandwidth=0.0))
            fast, slow = averagers[0], averagers[2]

            def one_round() -> None:
                controls = [averager.step(wait=False, require_trigger=True) for averager in averagers]
                wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)
                run_allreduce(controls, timeout=30)

            one_round()
            # first round: cut at the last call after about two thirds of its parts; its own values were not averaged
            assert 0 < int((_values(fast) == 1.0).sum()) < SIZE, _values(fast)
            assert bool((_values(slow) == 3.0).all())
            for _ in range(2):  # averaged with the others by the second round, or at worst the third
                one_round()
                if torch.allclose(_values(slow), _values(fast)):
                    break
            for averager in averagers:  # every part was averaged with every peer: the same values everywhere
                torch.testing.assert_close(_values(averager), _values(fast))
            assert bool((_values(slow) < 3.0).all())
        finally:
            for averager in averagers:
                averager.shutdown()
