"""A frame that does not fit its peer's share only because requests parked for their handlers fill it waits a bounded
time for room instead of being refused at once; frames that wait are bounded like frames in flight (real daemons on
127.0.0.1).

Measured before this: one client calling 12 experts of one server at once with 16 MiB inputs (4 MiB chunks) had 2 of
its 12 forward streams refused in 3 steps, since chunks waiting for the busy handlers filled its 64 MiB share."""

import asyncio
from typing import List

import pytest
from test_p2p_inbound_budget_prefetch import HANDLER, CountingBudget, GatedCounter, start_server, wait_until
from test_p2p_inbound_budget_share_release import SMALL_MESSAGE, SMALL_REQUEST, request_frame

from hivemind.p2p import P2P, framing
from hivemind.p2p.inbound_budget import InboundBudget, InboundBudgetExceeded
from hivemind.proto import runtime_pb2

pytestmark = pytest.mark.timeout(60)

MiB = 1024**2
SHARE = 8 * MiB  # five SMALL_REQUESTs (7.5 MiB) fit


def small_budget(wait: float) -> CountingBudget:
    return CountingBudget(per_peer_floor=SHARE, per_peer_frames=1, wait=wait)


async def open_stream(client: P2P, server: P2P, count: int):
    _, reader, writer = await client.call_binary_stream_handler(server.peer_id, HANDLER)
    writer.write(request_frame(SMALL_REQUEST) * count + framing.END_OF_STREAM_FRAME)
    await writer.drain()
    return reader, writer


async def replies(streams) -> List[str]:
    answers = await asyncio.gather(*(framing.receive_protobuf(runtime_pb2.Tensor, reader) for reader, _ in streams))
    return [f"error: {error.message}" if error is not None else str(list(reply.size)) for reply, error in answers]


async def test_new_stream_waits_while_requests_parked_on_another_stream_fill_the_share(p2p_factory):
    handler, budget = GatedCounter(), small_budget(wait=30)
    server, client = await start_server(p2p_factory, handler, budget, max_message=SMALL_MESSAGE)
    parked = await open_stream(client, server, 5)
    await wait_until(lambda: budget.parked_by(client.peer_id) == 5 * SMALL_REQUEST)
    new = await open_stream(client, server, 1)
    try:
        await wait_until(lambda: budget.refusals or budget.waiting_by(client.peer_id) == SMALL_REQUEST)
        assert not budget.refusals, "a new stream was refused because another stream's requests wait for a handler"
        handler.gate.set()
        assert await replies([parked, new]) == ["[5]", "[1]"]
        assert not budget.refusals
        await wait_until(lambda: budget.total_held == 0 and budget.waiting_by(client.peer_id) == 0)
    finally:
        for _, writer in (parked, new):
            writer.close()


async def test_new_stream_is_refused_once_parked_requests_stay_for_the_whole_wait(p2p_factory):
    handler, budget = GatedCounter(), small_budget(wait=0.3)
    server, client = await start_server(p2p_factory, handler, budget, max_message=SMALL_MESSAGE)
    parked = await open_stream(client, server, 5)
    await wait_until(lambda: budget.parked_by(client.peer_id) == 5 * SMALL_REQUEST)
    new = await open_stream(client, server, 1)
    try:
        await wait_until(lambda: budget.refusals)
        assert "within 0.3 s" in str(budget.refusals[0])
        assert budget.held_by(client.peer_id) == 5 * SMALL_REQUEST and budget.waiting_by(client.peer_id) == 0
        handler.gate.set()
        parked_reply, new_reply = await replies([parked, new])
        assert parked_reply == "[5]" and "within 0.3 s" in new_reply
        await wait_until(lambda: budget.total_held == 0)
    finally:
        for _, writer in (parked, new):
            writer.close()


async def test_frames_waiting_for_room_are_bounded_like_frames_in_flight(p2p_factory):
    handler, budget = GatedCounter(), small_budget(wait=30)
    server, client = await start_server(p2p_factory, handler, budget, max_message=SMALL_MESSAGE)
    parked = await open_stream(client, server, 5)
    await wait_until(lambda: budget.parked_by(client.peer_id) == 5 * SMALL_REQUEST)
    more = await asyncio.gather(*(open_stream(client, server, 1) for _ in range(8)))
    try:
        # five frames may wait (what could be in flight at once), the other three are refused without waiting
        await wait_until(lambda: len(budget.refusals) == 3 and budget.waiting_by(client.peer_id) == 5 * SMALL_REQUEST)
        assert all(f"{SHARE} bytes allowed per peer" in str(refusal) for refusal in budget.refusals)
        handler.gate.set()
        answers = await replies([parked, *more])
        assert answers[0] == "[5]" and sorted(answers[1:]).count("[1]") == 5
        assert sum(answer.startswith("error") for answer in answers) == 3
        await wait_until(lambda: budget.total_held == 0 and budget.waiting_by(client.peer_id) == 0)
    finally:
        for _, writer in (parked, *more):
            writer.close()


async def test_a_frame_waiting_for_room_gets_it_when_a_parked_request_is_taken():
    budget = InboundBudget(per_peer_floor=SHARE, per_peer_frames=1, wait=30)
    parked = [await budget.lease("peer", 3 * MiB, MiB) for _ in range(2)]
    for lease in parked:
        lease.park()
    waiting = asyncio.create_task(budget.lease("peer", 3 * MiB, MiB))
    await wait_until(lambda: budget.waiting_by("peer") == 3 * MiB)
    parked[0].release()
    admitted = await asyncio.wait_for(waiting, 5)
    assert budget.held_by("peer") == 6 * MiB and budget.waiting_by("peer") == 0
    for lease in (admitted, parked[1], parked[1]):
        lease.release()
    assert budget.held_by("peer") == budget.total_held == 0


async def test_a_frame_cancelled_while_it_waits_for_room_leaves_nothing_behind():
    budget = InboundBudget(per_peer_floor=SHARE, per_peer_frames=1, wait=30)
    parked = [await budget.lease("peer", 3 * MiB, MiB) for _ in range(2)]
    for lease in parked:
        lease.park()
    waiting = asyncio.create_task(budget.lease("peer", 3 * MiB, MiB))
    await wait_until(lambda: budget.waiting_by("peer") == 3 * MiB)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert budget.waiting_by("peer") == 0 and budget.held_by("peer") == 6 * MiB
    for lease in parked:
        lease.release()
    assert budget.held_by("peer") == budget.total_held == budget.parked_by("peer") == 0


async def test_a_frame_that_would_not_fit_beside_the_frames_in_flight_is_refused_without_waiting():
    budget = InboundBudget(per_peer_floor=SHARE, per_peer_frames=1, wait=30)
    in_flight = await budget.lease("peer", 6 * MiB, MiB)  # not parked: still being received
    with pytest.raises(InboundBudgetExceeded, match="already holds"):
        await asyncio.wait_for(budget.lease("peer", 3 * MiB, MiB), 5)
    in_flight.park()  # the same bytes, now waiting for their handler: a new frame may wait for them
    waiting = asyncio.create_task(budget.lease("peer", 3 * MiB, MiB))
    await wait_until(lambda: budget.waiting_by("peer") == 3 * MiB)
    in_flight.release()
    (await waiting).release()
    assert budget.total_held == budget.waiting_by("peer") == 0


async def test_a_frame_waiting_for_room_gets_the_share_of_a_frame_that_gave_up_waiting_for_the_total():
    budget = InboundBudget(32 * MiB, per_peer_floor=SHARE, per_peer_frames=1, wait=30)  # 8 MiB per peer
    others = [await budget.lease(f"other {i}", size * MiB, MiB) for i, size in enumerate((7, 6, 6, 6))]  # 25 MiB
    parked = await budget.lease("peer", 6 * MiB, MiB)
    parked.park()
    for_total = asyncio.create_task(budget.lease("peer", 2 * MiB, MiB))  # fits the peer's share, not the total
    await wait_until(lambda: budget.held_by("peer") == 8 * MiB)
    for_share = asyncio.create_task(budget.lease("peer", MiB, MiB))  # waits for the peer's share
    await wait_until(lambda: budget.waiting_by("peer") == MiB)
    for_total.cancel()  # its stream closed: its share is free again, and the total has room for 1 MiB
    await asyncio.gather(for_total, return_exceptions=True)
    admitted = await asyncio.wait_for(for_share, 5)
    assert budget.held_by("peer") == 7 * MiB and budget.total_held == 32 * MiB
    for lease in (admitted, parked, *others):
        lease.release()
    assert budget.total_held == 0 and budget.waiting_by("peer") == 0


async def test_handlers_that_wait_for_each_other_across_streams_of_one_peer_end_after_the_wait(p2p_factory):
    """The first stream's handler waits for the second stream's input while its own requests fill the share: the
    second stream's frame waits for room (the first stream's requests are never taken), then is refused; nothing
    hangs, and every share is given back."""
    budget = small_budget(wait=0.3)
    second_input = asyncio.get_running_loop().create_future()

    streams = []

    async def handler(requests, context) -> runtime_pb2.Tensor:
        streams.append(context)
        if len(streams) == 1:
            return runtime_pb2.Tensor(size=[await second_input])  # takes none of its own input meanwhile
        try:
            count = sum([1 async for _ in requests])
        except Exception:
            second_input.set_result(0)  # 0: the second stream's input was refused
            raise
        second_input.set_result(count)
        return runtime_pb2.Tensor(size=[count])

    server, client = await start_server(p2p_factory, handler, budget, max_message=SMALL_MESSAGE)
    first = await open_stream(client, server, 5)
    await wait_until(lambda: budget.parked_by(client.peer_id) == 5 * SMALL_REQUEST)
    second = await open_stream(client, server, 1)
    try:
        first_reply, second_reply = await asyncio.wait_for(replies([first, second]), 10)
        assert "within 0.3 s" in second_reply and first_reply == "[0]"
        await wait_until(lambda: budget.total_held == 0 and budget.waiting_by(client.peer_id) == 0)
    finally:
        for _, writer in (first, second):
            writer.close()
