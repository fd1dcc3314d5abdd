"""InboundBudget alone: per-peer shares refuse at once, the total waits a bounded time, all is given back."""

import asyncio

import pytest

from hivemind.p2p.framing import FramingError
from hivemind.p2p.inbound_budget import InboundBudget, InboundBudgetExceeded

pytestmark = pytest.mark.timeout(10)

MiB = 1024**2


def test_per_peer_limit_is_a_few_messages_at_least_the_floor_and_at_most_a_share_of_the_total():
    budget = InboundBudget(512 * MiB)
    assert budget.per_peer_limit(5 * MiB) == 64 * MiB  # 4 x 5 MiB is below the floor
    assert budget.per_peer_limit(24 * MiB) == 96 * MiB
    assert budget.per_peer_limit(256 * MiB) == 128 * MiB  # a quarter of the total
    assert budget.per_peer_limit(None) == 128 * MiB


async def test_frame_past_the_peer_share_is_refused_at_once_naming_the_limit():
    budget = InboundBudget(512 * MiB, wait=30.0)
    for _ in range(14):
        await budget.reserve("attacker", 4_500_000, 5 * MiB)
    with pytest.raises(InboundBudgetExceeded, match=f"{64 * MiB} bytes allowed per peer") as refusal:
        await asyncio.wait_for(budget.reserve("attacker", 4_500_000, 5 * MiB), timeout=1)
    assert isinstance(refusal.value, FramingError)
    assert budget.held_by("attacker") == budget.total_held == 14 * 4_500_000


async def test_other_peers_keep_their_share_while_one_peer_is_full():
    budget = InboundBudget(512 * MiB)
    while budget.held_by("attacker") + 4 * MiB <= budget.per_peer_limit(4 * MiB):
        await budget.reserve("attacker", 4 * MiB, 4 * MiB)
    await asyncio.wait_for(budget.reserve("honest", 4 * MiB, 4 * MiB), timeout=1)
    assert budget.held_by("honest") == 4 * MiB


async def test_first_frame_of_a_peer_may_exceed_its_share_alone():
    budget = InboundBudget(64 * MiB)  # per peer: a quarter, 16 MiB
    await budget.reserve("peer", 40 * MiB, None)
    with pytest.raises(InboundBudgetExceeded):
        await budget.reserve("peer", 1, None)


async def test_frame_that_fits_its_share_waits_for_room_in_the_total_and_then_starts():
    budget = InboundBudget(32 * MiB, per_peer_floor=8 * MiB, wait=5.0)
    for peer in ("a", "b", "c", "d"):
        await budget.reserve(peer, 8 * MiB, MiB)
    waiting = asyncio.create_task(budget.reserve("e", 8 * MiB, MiB))
    await asyncio.sleep(0)
    assert not waiting.done() and budget.held_by("e") == 8 * MiB  # holds its share, not the total
    budget.release("a", 8 * MiB)
    await asyncio.wait_for(waiting, timeout=1)
    assert budget.total_held == 32 * MiB


async def test_frame_refused_after_waiting_for_the_total_gives_its_share_back():
    budget = InboundBudget(32 * MiB, per_peer_floor=8 * MiB, wait=0.05)
    for peer in ("a", "b", "c", "d"):
        await budget.reserve(peer, 8 * MiB, MiB)
    with pytest.raises(InboundBudgetExceeded, match=f"{32 * MiB} bytes allowed in all within 0.05 s"):
        await budget.reserve("e", 8 * MiB, MiB)
    assert budget.held_by("e") == 0 and budget.total_held == 32 * MiB


async def test_any_frame_starts_when_nothing_is_in_flight():
    budget = InboundBudget(16 * MiB, per_peer_floor=MiB, wait=0)
    await budget.reserve("peer", 100 * MiB, None)
    assert budget.total_held == 100 * MiB


async def test_frame_context_gives_everything_back_when_the_stream_fails():
    budget = InboundBudget()
    with pytest.raises(ConnectionResetError):
        async with budget.frame("peer", 3 * MiB, 5 * MiB):
            assert budget.held_by("peer") == budget.total_held == 3 * MiB
            raise ConnectionResetError("stream reset")
    assert budget.held_by("peer") == budget.total_held == 0


async def test_cancelled_wait_gives_the_share_back():
    budget = InboundBudget(16 * MiB, per_peer_floor=8 * MiB, wait=30.0)
    await budget.reserve("a", 16 * MiB, MiB)
    waiting = asyncio.create_task(budget.reserve("b", 8 * MiB, MiB))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.held_by("b") == 0


async def test_small_frames_pass_while_the_peer_share_is_full():
    budget = InboundBudget(64 * MiB, per_peer_floor=MiB, wait=0)
    await budget.reserve("peer", 16 * MiB, MiB)
    async with budget.frame("peer", 64 * 1024, MiB):
        assert budget.held_by("peer") == 16 * MiB
    with pytest.raises(InboundBudgetExceeded):
        async with budget.frame("peer", 64 * 1024 + 1, MiB):
            pass


async def test_identities_that_only_announce_frames_do_not_block_other_peers_by_default():
    # frames count at their announced length, which costs a sender nothing but a header: by default there is no
    # total that ten such identities could fill, so an honest peer's part still starts at once
    budget = InboundBudget()
    part_limit = 5 * MiB
    for attacker in range(10):
        while True:
            try:
                await budget.reserve(f"attacker{attacker}", part_limit, part_limit)
            except InboundBudgetExceeded:
                break
    assert budget.held_by("attacker0") == budget.per_peer_limit(part_limit) // part_limit * part_limit
    await asyncio.wait_for(budget.reserve("honest", 4 * MiB, part_limit), timeout=1.0)
    assert budget.held_by("honest") == 4 * MiB


def test_a_total_is_only_applied_when_given():
    assert InboundBudget().per_peer_limit(5 * MiB) == 64 * MiB
    assert InboundBudget(128 * MiB).per_peer_limit(5 * MiB) == 32 * MiB
    with pytest.raises(ValueError):
        InboundBudget(0)
