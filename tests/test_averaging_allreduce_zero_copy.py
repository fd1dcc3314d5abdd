"""Parts and deltas received as ReceivedAveragingData (what DecentralizedAverager's handler takes) are decoded from
the received frames without copies, and malformed ones are refused and banned as before."""

import asyncio
import os
from typing import AsyncIterator

import numpy as np
import pytest
import torch
from allreduce_helpers import PREFIX, AllreduceRouter, collect, hivemind_logs, make_connected_peers, sender_messages

from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.part_encoding import ReceivedAveragingData
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import Float16Compression, Uniform8BitQuantization
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import as_aiter

__all__ = ["hivemind_logs"]  # the fixture, used by the tests below

pytestmark = pytest.mark.timeout(60)

SIZE = 600_000  # float32: parts of 512 KiB (large enough to stay in their frames), at least two per reducer


class BulkRouter(AllreduceRouter):
    """AllreduceRouter whose handler takes parts as ReceivedAveragingData, as the averager's does."""

    async def rpc_aggregate_part(
        self, parts: AsyncIterator[ReceivedAveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super().rpc_aggregate_part(parts, context):
            yield message


async def _bulk_group(p2p_factory, count: int, values, fractions, **kwargs):
    peers = await make_connected_peers(p2p_factory, count)
    routers = [BulkRouter() for _ in peers]
    await asyncio.gather(*(router.add_p2p_handlers(peer, namespace=PREFIX) for router, peer in zip(routers, peers)))
    group_id = os.urandom(20)
    runners = []
    for i in range(len(values)):
        runner = AllReduceRunner(
            p2p=peers[i], servicer_type=BulkRouter, prefix=PREFIX, group_id=group_id, tensors=[values[i]],
            ordered_peer_ids=[peer.peer_id for peer in peers], peer_fractions=fractions, **kwargs,
        )  # fmt: skip
        routers[i].register(runner)
        runners.append(runner)
    return peers, runners, group_id


async def test_parts_and_deltas_are_views_of_the_received_frames(p2p_factory, monkeypatch):
    decoded = []  # (message type, whether the tensor lies inside the frame's bulk)
    original = AllReduceRunner._decode

    async def spying_decode(self, message, part, what):
        tensor = await original(self, message, part, what)
        bulk = getattr(message, "bulk", None)
        start = np.frombuffer(bulk, dtype=np.uint8).ctypes.data if bulk is not None else -1
        decoded.append((type(message), bulk is not None and start <= tensor.data_ptr() < start + len(bulk)))
        return tensor

    monkeypatch.setattr(AllReduceRunner, "_decode", spying_decode)
    values = [torch.randn(SIZE) for _ in range(2)]
    _, runners, _ = await _bulk_group(p2p_factory, 2, values, [1.0, 1.0])
    deltas = await asyncio.gather(*(collect(runner) for runner in runners))
    for value, (delta,) in zip(values, deltas):
        torch.testing.assert_close(value + delta, (values[0] + values[1]) / 2, rtol=0, atol=1e-6)
    parts_each = len(runners[0].container.parts_by_peer[1])
    assert len(decoded) == 2 * (parts_each + len(runners[0].container.parts_by_peer[0]))  # parts and deltas
    assert all(kind is ReceivedAveragingData and is_view for kind, is_view in decoded), decoded


def _nan_buffer(k, tensor):
    tensor.buffer = np.full(len(tensor.buffer) // 4, np.nan, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda k, t: setattr(t, "buffer", t.buffer[:-3]), "could not be decoded"),
        (lambda k, t: t.size.__setitem__(0, t.size[0] - 1), "elements"),
        (lambda k, t: setattr(t, "dtype", "int32"), "int32"),
        (_nan_buffer, "inf/NaN"),
    ],
    ids=["truncated-buffer", "wrong-size", "wrong-dtype", "nan"],
)
async def test_a_malformed_large_part_is_refused_and_its_sender_banned(p2p_factory, hivemind_logs, corrupt, reason):
    values = [torch.randn(SIZE) for _ in range(3)]
    fractions = [1.0, 1.0, 0.0]  # the third peer only sends, and sends garbage
    peers, runners, group_id = await _bulk_group(p2p_factory, 3, values[:2], fractions, sender_timeout=5)
    tasks = [asyncio.create_task(collect(runner)) for runner in runners]
    client = TensorPartContainer([values[2]], fractions)
    for reducer in (0, 1):
        stub = BulkRouter.get_stub(peers[2], peers[reducer].peer_id, namespace=PREFIX)
        messages = sender_messages(client, reducer, group_id, corrupt=lambda k, t: k == 1 and corrupt(k, t))
        replies = [reply async for reply in await stub.rpc_aggregate_part(as_aiter(*messages))]
        assert [reply.code for reply in replies][-1] == averaging_pb2.INTERNAL_ERROR
    deltas = await asyncio.gather(*tasks)
    for i in (0, 1):  # the garbage part changed nothing; the first part of each reducer kept the third's values
        result = values[i] + deltas[i][0]
        assert torch.isfinite(result).all()
        for reducer in (0, 1):
            for k, part in enumerate(client.parts_by_peer[reducer]):
                senders = (0, 1, 2) if k == 0 else (0, 1)
                window = slice(part.start, part.stop)
                expected = sum(values[s][window] for s in senders) / len(senders)
                torch.testing.assert_close(result[window], expected, rtol=0, atol=1e-6)
    banned = [r.getMessage() for r in hivemind_logs.records if "excluded sender" in r.getMessage()]
    assert len(banned) == 2 and all(str(peers[2].peer_id) in line and reason in line for line in banned), banned


@pytest.mark.parametrize(
    "compression, max_error, mean_error",
    [(Float16Compression(), 1e-2, 1e-3), (Uniform8BitQuantization(), 2.0, 0.05)],  # 8-bit: outliers lose most
)
async def test_compressed_large_parts_and_deltas_average_correctly(p2p_factory, compression, max_error, mean_error):
    values = [torch.randn(SIZE) for _ in range(2)]
    _, runners, _ = await _bulk_group(p2p_factory, 2, values, [1.0, 1.0], compression=compression)
    deltas = await asyncio.gather(*(collect(runner) for runner in runners))
    for value, (delta,) in zip(values, deltas):
        error = (value + delta - (values[0] + values[1]) / 2).abs()
        assert float(error.max()) < max_error and float(error.mean()) < mean_error
