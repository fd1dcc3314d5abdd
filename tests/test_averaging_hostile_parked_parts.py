"""All-reduce streams whose parts name a group the averager has not registered wait for it (a member may
still be setting up), holding their first message meanwhile. One peer may park at most MAX_PARKED_PARTS_PER_PEER
such streams; the others are refused at once, so that streams for made-up groups cannot pin memory for seconds each
(before: 100 streams of 4.5 MiB from one peer held +600 MiB in the averager for 5 s)."""

import asyncio
import os

import pytest
import torch
from averaging_hostile_peer import PREFIX, hostile_setup

from hivemind.averaging.averager_rounds import GROUP_SETUP_TIMEOUT, MAX_PARKED_PARTS_PER_PEER
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import averaging_pb2, runtime_pb2

pytestmark = pytest.mark.timeout(60)
STREAMS = MAX_PARKED_PARTS_PER_PEER + 4


async def _send_part_for_unknown_group(hostile, victim, release: asyncio.Event) -> int:
    """Open one all-reduce stream to the victim with a 256 KiB part for a made-up group; the code of its reply."""

    async def requests():
        part = runtime_pb2.Tensor(buffer=bytes(2**18), dtype="float32", size=[2**16])
        yield averaging_pb2.AveragingData(group_id=os.urandom(20), tensor_part=part)
        await release.wait()

    name = get_handle_name(PREFIX, "DecentralizedAverager", "rpc_aggregate_part")
    stream = await hostile.p2p.iterate_protobuf_handler(victim.peer_id, name, requests(), averaging_pb2.AveragingData)
    async for reply in stream:
        return reply.code
    return -1


async def test_parts_for_unknown_groups_beyond_the_per_peer_limit_are_refused_at_once():
    async with hostile_setup([torch.zeros(16)]) as (hostile, victim):
        release = asyncio.Event()
        calls = [asyncio.create_task(_send_part_for_unknown_group(hostile, victim, release)) for _ in range(STREAMS)]
        try:
            done, pending = await asyncio.wait(calls, timeout=GROUP_SETUP_TIMEOUT - 1.5)
            assert len(done) == STREAMS - MAX_PARKED_PARTS_PER_PEER, "streams beyond the limit were kept waiting"
            assert all(call.result() == averaging_pb2.BAD_GROUP_ID for call in done)
            assert len(pending) == MAX_PARKED_PARTS_PER_PEER  # these may still be a member's early parts
        finally:
            release.set()
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)


def test_the_parked_bytes_limit_grows_with_the_configured_part_size():
    from types import SimpleNamespace

    from hivemind.averaging.averager_rounds import MAX_PARKED_PART_BYTES, AveragingRounds

    def limit(part_size_bytes: int) -> int:
        return AveragingRounds._parked_bytes_limit(SimpleNamespace(part_size_bytes=part_size_bytes))

    assert limit(2**19) == MAX_PARKED_PART_BYTES  # the default 512 KiB parts
    assert limit(64 * 2**20) >= 16 * 64 * 2**20  # 8 honest members' first 64 MiB parts are not refused
