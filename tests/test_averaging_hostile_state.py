"""A hostile state donor: the downloader's memory and time stay bounded whatever the donor streams."""

import asyncio

import pytest
import torch

from hivemind.averaging.state_download import StateAssembler, StateDownloadError
from hivemind.averaging.state_sharing import DonorBusyError, DownloadSlots
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer


def test_an_endless_stream_of_empty_chunks_is_refused():
    """Empty continuation chunks (11 bytes each on the wire) add no tensor bytes; without a chunk count limit a donor
    could stream them forever while the downloader keeps every one in memory."""
    head = serialize_torch_tensor(torch.zeros(4))
    head.chunks = 0  # announces no chunk count
    assembler = StateAssembler([torch.zeros(4)])
    assembler.add(averaging_pb2.DownloadData(metadata=MSGPackSerializer.dumps({}), tensor_part=head))
    empty = averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor())
    empty = averaging_pb2.DownloadData.FromString(empty.SerializeToString())
    with pytest.raises(StateDownloadError, match="chunks"):
        for _ in range(100_000):
            assembler.add(empty)
    assert len(assembler._parts) < 1000


async def test_one_peer_cannot_take_every_download_slot():
    """Each download holds a slot for as long as its reader is slow (up to the stall timeout per chunk): one peer
    that opens many downloads would lock every other newcomer out."""
    slots = DownloadSlots(max_active=4, max_waiting=16, max_wait=10)
    hostile, honest = PeerID(b"\x00\x24" + b"\x01" * 36), PeerID(b"\x00\x24" + b"\x02" * 36)
    release, entered = asyncio.Event(), []

    async def download(who):
        async with slots.acquire(who):
            entered.append(who)
            await release.wait()

    first = asyncio.create_task(download(hostile))
    await asyncio.sleep(0)
    with pytest.raises(DonorBusyError, match="already"):
        async with slots.acquire(hostile):
            pass
    second = asyncio.create_task(download(honest))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, second)
    assert entered == [hostile, honest] and (slots.active, slots.waiting) == (0, 0)
