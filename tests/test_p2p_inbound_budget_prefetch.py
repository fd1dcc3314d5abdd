"""Complete requests that wait in a stream's queue for a handler that has not taken them yet keep their peer's share
of the inbound budget: a peer that parks requests on many streams is refused once they fill its share, the share is
given back however the streams end, and an honest stream to a slow handler is slowed down, never refused (real
daemons on 127.0.0.1)."""

import asyncio
from typing import AsyncIterator, List, Tuple

import pytest

from hivemind.p2p import P2P, P2PContext, framing
from hivemind.p2p.inbound_budget import InboundBudget, InboundBudgetExceeded
from hivemind.proto import runtime_pb2

pytestmark = pytest.mark.timeout(60)

MiB = 1024**2
HANDLER = "gated"
MAX_MESSAGE = 5 * MiB
ANNOUNCED = 4_500_000  # per request frame: 14 fit the 64 MiB per-peer floor, the 15th does not
ADMITTED = 64 * MiB // ANNOUNCED


class CountingBudget(InboundBudget):
    """An InboundBudget that counts the frames it decided on and the frames told to wait, and keeps its refusals."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decided = self.told_to_wait = 0
        self.refusals: List[InboundBudgetExceeded] = []

    def fits_peer(self, peer, nbytes, max_message_size=None):
        fits = super().fits_peer(peer, nbytes, max_message_size)
        self.told_to_wait += not fits
        return fits

    async def reserve(self, peer, nbytes, max_message_size=None):
        try:
            await super().reserve(peer, nbytes, max_message_size)
        except InboundBudgetExceeded as e:
            self.refusals.append(e)
            raise
        finally:
            self.decided += 1


class GatedCounter:
    """A stream-input handler that takes none of its input until ``gate`` is set, then counts the requests (and
    raises after ``fail_after`` of them, or returns after ``return_after`` of them, if given)."""

    def __init__(self, fail_after: int = 0, return_after: int = 0):
        self.gate = asyncio.Event()
        self.started = 0
        self.fail_after, self.return_after = fail_after, return_after

    async def __call__(self, requests: AsyncIterator[runtime_pb2.Tensor], context: P2PContext) -> runtime_pb2.Tensor:
        self.started += 1
        await self.gate.wait()
        count = 0
        async for _ in requests:
            count += 1
            if count == self.fail_after:
                raise RuntimeError(f"handler failed after {count} requests")
            if count == self.return_after:
                break
        return runtime_pb2.Tensor(size=[count])


async def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll the server's bookkeeping (it changes in callbacks driven by p2pd, not on events of this test)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def start_server(p2p_factory, handler, budget: InboundBudget, max_message: int = MAX_MESSAGE):
    server = await p2p_factory()
    server.inbound_budget = budget
    await server.add_protobuf_handler(
        HANDLER, handler, runtime_pb2.Tensor, stream_input=True, max_message_size=max_message
    )
    client = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    await client.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    return server, client


async def send_complete_requests(
    client: P2P, server: P2P, count: int, *, end: bool = True
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw stream and write ``count`` complete ANNOUNCED-byte requests (and the end of the input)."""
    _, reader, writer = await client.call_binary_stream_handler(server.peer_id, HANDLER)
    frame = framing.encode_frame(runtime_pb2.Tensor(buffer=bytes(ANNOUNCED - 5)))
    assert len(frame) == framing.FRAME_HEADER_LEN + ANNOUNCED
    for _ in range(count):
        writer.write(frame)
    if end:
        writer.write(framing.END_OF_STREAM_FRAME)
    await writer.drain()
    return reader, writer


async def test_requests_parked_on_many_streams_are_refused_once_they_fill_the_peer_share(p2p_factory):
    # the stream beyond the share waits (up to `wait`) for the parked requests to be taken, then is refused
    handler, budget = GatedCounter(), CountingBudget(wait=0.5)
    server, attacker = await start_server(p2p_factory, handler, budget)
    streams = await asyncio.gather(*(send_complete_requests(attacker, server, 1) for _ in range(ADMITTED + 1)))
    try:
        await wait_until(lambda: budget.decided == ADMITTED + 1)
        assert len(budget.refusals) == 1, "requests that wait for their handler were not counted"
        assert f"{64 * MiB} bytes allowed per peer" in str(budget.refusals[0])  # at once, or after waiting 0.5 s
        assert budget.held_by(attacker.peer_id) == ADMITTED * ANNOUNCED

        handler.gate.set()
        answers = await asyncio.gather(*(framing.receive_protobuf(runtime_pb2.Tensor, r) for r, _ in streams))
        assert (
            sorted(list(response.size) if response is not None else [] for response, _ in answers)
            == [[]] + [[1]] * ADMITTED
        )
        refused = [error for _, error in answers if error is not None]
        assert len(refused) == 1 and f"{64 * MiB} bytes allowed per peer" in refused[0].message
    finally:
        for _, writer in streams:
            writer.close()
    await wait_until(lambda: budget.total_held == 0)


@pytest.mark.parametrize(
    "handler_kwargs, expected",
    [
        pytest.param({}, "size [4]", id="handler_takes_every_request"),
        pytest.param({"fail_after": 1}, "handler failed after 1 requests", id="handler_raises"),
        pytest.param({"return_after": 1}, "size [1]", id="handler_returns_early"),
    ],
)
async def test_share_is_given_back_however_the_handler_ends(p2p_factory, handler_kwargs, expected):
    handler, budget = GatedCounter(**handler_kwargs), InboundBudget()
    server, client = await start_server(p2p_factory, handler, budget)
    reader, writer = await send_complete_requests(client, server, 4)
    try:
        await wait_until(lambda: budget.held_by(client.peer_id) == 4 * ANNOUNCED)
        handler.gate.set()
        response, error = await framing.receive_protobuf(runtime_pb2.Tensor, reader)
        assert (error.message if error is not None else f"size {list(response.size)}") == expected
        await wait_until(lambda: budget.total_held == 0)  # each request gave its share back (taken or dropped)
    finally:
        writer.close()


async def test_share_is_given_back_when_the_caller_closes_with_requests_parked(p2p_factory):
    handler, budget = GatedCounter(), InboundBudget()
    server, client = await start_server(p2p_factory, handler, budget)
    _, writer = await send_complete_requests(client, server, 3)
    await wait_until(lambda: budget.held_by(client.peer_id) == 3 * ANNOUNCED)
    writer.close()  # the handler is cancelled without taking its input
    await wait_until(lambda: budget.total_held == 0)
    assert handler.started == 1 and not handler.gate.is_set()


async def test_share_is_given_back_when_the_caller_leaves_mid_input(p2p_factory):
    handler, budget = GatedCounter(), InboundBudget()
    server, client = await start_server(p2p_factory, handler, budget)
    _, writer = await send_complete_requests(client, server, 3, end=False)
    writer.write(framing.encode_header(framing.MESSAGE_MARKER, ANNOUNCED) + bytes(MiB))  # a 4th frame, unfinished
    await wait_until(lambda: budget.held_by(client.peer_id) == 4 * ANNOUNCED)
    writer.transport.abort()
    await wait_until(lambda: budget.held_by(client.peer_id) == 3 * ANNOUNCED)  # the unfinished frame failed
    handler.gate.set()  # the handler still gets the complete requests, then the input's failure
    await wait_until(lambda: budget.total_held == 0)


async def test_share_is_given_back_when_the_server_cancels_its_handlers(p2p_factory):
    handler, budget = GatedCounter(), InboundBudget()
    server, client = await start_server(p2p_factory, handler, budget)
    reader, writer = await send_complete_requests(client, server, 3)
    try:
        await wait_until(lambda: budget.held_by(client.peer_id) == 3 * ANNOUNCED)
        await server.shutdown()
        assert budget.total_held == 0
    finally:
        writer.close()


async def test_single_request_handler_gives_its_share_back(p2p_factory):
    budget = InboundBudget()
    server = await p2p_factory()
    server.inbound_budget = budget

    async def echo_size(request: runtime_pb2.Tensor, context: P2PContext) -> AsyncIterator[runtime_pb2.Tensor]:
        assert budget.total_held == 0  # taken out of the queue: no longer counted
        yield runtime_pb2.Tensor(size=[len(request.buffer)])

    await server.add_protobuf_handler(
        HANDLER, echo_size, runtime_pb2.Tensor, stream_output=True, max_message_size=MAX_MESSAGE
    )
    client = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    await client.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    request = runtime_pb2.Tensor(buffer=bytes(ANNOUNCED))
    stream = await client.iterate_protobuf_handler(server.peer_id, HANDLER, request, runtime_pb2.Tensor)
    responses = [response async for response in stream]
    assert [list(r.size) for r in responses] == [[ANNOUNCED]]
    await wait_until(lambda: budget.total_held == 0)


async def test_honest_stream_of_large_requests_to_a_slow_handler_waits_instead_of_being_refused(p2p_factory):
    # per peer 8 MiB: five 1.5 MiB requests fit, the sixth must wait until the handler takes one
    message_size, count = 1536 * 1024, 24
    budget = CountingBudget(per_peer_floor=8 * MiB, per_peer_frames=1)
    peaks = []

    async def slow_sum(requests: AsyncIterator[runtime_pb2.Tensor], context: P2PContext) -> runtime_pb2.Tensor:
        await wait_until(lambda: budget.decided > 5 or budget.told_to_wait)  # the sixth request did not fit
        total = 0
        async for request in requests:
            peaks.append(budget.held_by(context.remote_id))
            total += len(request.buffer)
        return runtime_pb2.Tensor(size=[total])

    server, client = await start_server(p2p_factory, slow_sum, budget, max_message=2 * MiB)

    async def requests():
        for _ in range(count):
            yield runtime_pb2.Tensor(buffer=bytes(message_size))

    answer = await client.call_protobuf_handler(server.peer_id, HANDLER, requests(), runtime_pb2.Tensor)
    assert list(answer.size) == [count * message_size]
    assert budget.told_to_wait and not budget.refusals and max(peaks) <= 8 * MiB
    await wait_until(lambda: budget.total_held == 0)


async def test_a_lease_gives_its_share_back_exactly_once():
    budget = InboundBudget()
    lease = await budget.lease("peer", 3 * MiB, MAX_MESSAGE)
    other = await budget.lease("peer", 2 * MiB, MAX_MESSAGE)
    lease.release()
    lease.release()
    assert budget.held_by("peer") == budget.total_held == 2 * MiB
    other.release()
    assert budget.held_by("peer") == budget.total_held == 0


async def test_fits_peer_tells_in_advance_what_the_per_peer_check_refuses():
    budget = InboundBudget(per_peer_floor=8 * MiB, per_peer_frames=1)
    admission = budget.for_peer("peer", MiB)
    assert admission.fits(100 * MiB)  # a peer that holds nothing may start any frame
    lease = await admission.hold(6 * MiB)
    assert admission.fits(2 * MiB) and admission.fits(64 * 1024) and not admission.fits(2 * MiB + 1)
    with pytest.raises(InboundBudgetExceeded):
        await admission.hold(2 * MiB + 1)
    lease.release()
    assert budget.total_held == 0
