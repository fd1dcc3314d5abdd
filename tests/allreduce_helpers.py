"""Shared set-up for the all-reduce tests: connected peers on 127.0.0.1 and a servicer that routes
``rpc_aggregate_part`` calls to the AllReduceRunner of their group (the averager does this in production)."""

import asyncio
import logging
import os
from typing import AsyncIterator, Dict, List, Optional, Sequence

import pytest
import torch

from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import TensorPartContainer
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter, await_with_timeout

PREFIX = "test_allreduce"


@pytest.fixture
def hivemind_logs(caplog):
    """``caplog`` with every DEBUG record of the ``hivemind`` loggers (import this fixture into the test module)."""
    logger = logging.getLogger("hivemind")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.DEBUG, logger="hivemind"):
        yield caplog
    logger.removeHandler(caplog.handler)


class AllreduceRouter(ServicerBase):
    """Serves ``<prefix>::AllreduceRouter.rpc_aggregate_part`` and hands each call to the runner of its group id."""

    def __init__(self):
        self.runners: Dict[bytes, AllReduceRunner] = {}
        self._registered = asyncio.Event()

    def register(self, runner: AllReduceRunner) -> None:
        self.runners[runner.group_id] = runner
        self._registered.set()
        self._registered = asyncio.Event()

    async def rpc_aggregate_part(
        self, parts: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        first = await await_with_timeout(anext(parts), 10)
        deadline = asyncio.get_running_loop().time() + 10
        while first.group_id not in self.runners and asyncio.get_running_loop().time() < deadline:
            await await_with_timeout(self._registered.wait(), 10)
        runner = self.runners.get(first.group_id)
        if runner is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.MessageCode.BAD_GROUP_ID)  # unknown group
            return
        async for message in runner.rpc_aggregate_part(achain(as_aiter(first), parts), context):
            yield message


async def make_connected_peers(p2p_factory, count: int) -> List[P2P]:
    peers: List[P2P] = []
    for _ in range(count):
        initial_peers = [maddr for peer in peers for maddr in await peer.get_visible_maddrs()]
        peers.append(await p2p_factory(initial_peers=initial_peers or None))
    for peer in peers:
        await peer.wait_for_at_least_n_peers(count - 1, attempts=200, delay=0.05) if count > 1 else None
    return peers


async def start_routers(peers: Sequence[P2P]) -> List[AllreduceRouter]:
    routers = [AllreduceRouter() for _ in peers]
    await asyncio.gather(*(router.add_p2p_handlers(peer, namespace=PREFIX) for router, peer in zip(routers, peers)))
    return routers


def make_runner(peer: P2P, router: AllreduceRouter, peers: Sequence[P2P], group_id: bytes, tensors, **kwargs):
    kwargs.setdefault("peer_fractions", [1.0] * len(peers))
    runner = AllReduceRunner(
        p2p=peer,
        servicer_type=AllreduceRouter,
        prefix=PREFIX,
        group_id=group_id,
        tensors=tensors,
        ordered_peer_ids=[p.peer_id for p in peers],
        **kwargs,
    )
    router.register(runner)
    return runner


async def collect(runner: AllReduceRunner) -> List[torch.Tensor]:
    return [delta async for delta in runner]


async def run_group(
    peers: Sequence[P2P],
    routers: Sequence[AllreduceRouter],
    tensors_by_peer: Sequence[Sequence[torch.Tensor]],
    *,
    group_id: Optional[bytes] = None,
    per_peer_kwargs: Optional[Sequence[dict]] = None,
    **kwargs,
) -> List[List[torch.Tensor]]:
    """Run one all-reduce in which every peer takes part; returns each peer's deltas."""
    group_id = group_id or os.urandom(20)
    per_peer_kwargs = per_peer_kwargs or [{} for _ in peers]
    runners = [
        make_runner(peer, router, peers, group_id, tensors, **kwargs, **extra)
        for peer, router, tensors, extra in zip(peers, routers, tensors_by_peer, per_peer_kwargs)
    ]
    return list(await asyncio.gather(*(collect(runner) for runner in runners)))


def sender_messages(container, reducer_index: int, group_id: bytes, weight: float = 1.0, corrupt=None):
    """The AveragingData messages an honest sender would stream to one reducer (``corrupt(k, tensor_msg)`` may
    change part ``k`` in place first)."""
    messages = []
    for k, part in enumerate(container.parts_by_peer[reducer_index]):
        message = averaging_pb2.AveragingData(weight=weight)
        if k == 0:
            message.code, message.group_id = averaging_pb2.PART_FOR_AVERAGING, group_id
        message.tensor_part.CopyFrom(container.compress_part(part))
        if corrupt is not None:
            corrupt(k, message.tensor_part)
        messages.append(message)
    return messages


async def call_reducer(peer: P2P, reducer: P2P, messages) -> List[averaging_pb2.AveragingData]:
    """Stream ``messages`` (a list or an async iterator) to ``reducer``; returns its replies."""
    stub = AllreduceRouter.get_stub(peer, reducer.peer_id, namespace=PREFIX)
    stream = as_aiter(*messages) if isinstance(messages, list) else messages
    return [reply async for reply in await stub.rpc_aggregate_part(stream)]


def assert_two_averaged_without_the_third(values, deltas, container) -> None:
    """Peers 0 and 1 of a group of three got the mean of their two values for every part, except the parts that peer 2
    (failed, or not in the round) was to reduce: those keep each peer's own values."""
    for i in (0, 1):
        result = values[i] + deltas[i][0]
        for part in container.parts:
            window = slice(part.start, part.stop)
            expected = values[i][window] if part.reducer == 2 else (values[0][window] + values[1][window]) / 2
            torch.testing.assert_close(result[window], expected, rtol=0, atol=1e-6)


PACED_SENDER_VALUES, HONEST_REDUCER_VALUES = (30.0, 60.0, 90.0), (0.0, 6.0)


async def round_with_paced_senders(p2p_factory, schedules, *, size: int, part_bytes: int, wait: float, **timeouts):
    """Two honest members (values 0 and 6) reduce; before them, one member per schedule (values 30, 60, 90) only
    sends, part k to each reducer at ``schedule(k)`` seconds after the round started (k from 0; a fixed schedule, so
    that a busy machine does not slow it further), or from the first k it gives None on, nothing more with its streams
    left open. Waits up to ``wait`` s for the honest members' results (own + delta), returns them and the round's
    duration."""
    peers = await make_connected_peers(p2p_factory, len(schedules) + 2)
    routers = await start_routers(peers)
    fractions = [0.0] * len(schedules) + [1.0, 1.0]
    group_id = os.urandom(20)
    honest = range(len(schedules), len(peers))
    runners = [
        make_runner(
            peers[i],
            routers[i],
            peers,
            group_id,
            [torch.full((size,), value)],
            peer_fractions=fractions,
            part_size_bytes=part_bytes,
            **timeouts,
        )  # fmt: skip
        for i, value in zip(honest, HONEST_REDUCER_VALUES)
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def paced(value, schedule, reducer_index):
        container = TensorPartContainer([torch.full((size,), value)], fractions, part_size_bytes=part_bytes)
        for k, message in enumerate(sender_messages(container, reducer_index, group_id)):
            if schedule(k) is None:
                await asyncio.Event().wait()  # (cancelled at the end of the round)
            await asyncio.sleep(max(0.0, started + schedule(k) - loop.time()))
            yield message

    sending = [
        asyncio.create_task(call_reducer(peers[d], peers[i], paced(PACED_SENDER_VALUES[d], schedule, i)))
        for d, schedule in enumerate(schedules)
        for i in honest
    ]
    try:
        deltas = await asyncio.wait_for(asyncio.gather(*(collect(runner) for runner in runners)), wait)
        elapsed = loop.time() - started
    finally:
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
    return [own + delta for own, (delta,) in zip(HONEST_REDUCER_VALUES, deltas)], elapsed
