"""State sharing without a network: donor ordering, rebuilding a state from messages, download slots."""

import asyncio
import random

import pytest
import torch

from hivemind.averaging.state_download import StateAssembler, StateDownloadError, decode_chunks, order_donors
from hivemind.averaging.state_sharing import DonorBusyError, DownloadSlots
from hivemind.compression import Float16Compression, NoCompression, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer, ValueWithExpiration
from hivemind.utils.streaming import split_for_streaming


def peer(index: int) -> PeerID:
    return PeerID(b"\x00\x24" + bytes([index]) * 36)


def entries(mapping) -> ValueWithExpiration:
    return ValueWithExpiration({key: ValueWithExpiration(value, 1e10) for key, value in mapping.items()}, 1e10)


def state_messages(metadata, tensors, chunk_size=2**16, codec=None):
    codec = codec or NoCompression()
    messages = []
    for tensor in tensors:
        serialized = serialize_torch_tensor(tensor, codec.compression_type)
        for chunk in split_for_streaming(serialized, chunk_size):
            messages.append(averaging_pb2.DownloadData(tensor_part=chunk))
    if not messages:
        messages.append(averaging_pb2.DownloadData())
    messages[0].metadata = MSGPackSerializer.dumps(metadata)
    return messages


def assemble(messages, expected=None, max_bytes=None):
    assembler = StateAssembler(expected, max_bytes)
    serialized = [finished for message in messages if (finished := assembler.add(message)) is not None]
    last = assembler.finish()
    if last is not None:
        serialized.append(last)
    tensors = [decode_chunks(chunks) for chunks in serialized]
    for index, tensor in enumerate(tensors):
        assembler.check_decoded(index, tensor)
    return assembler.metadata, tensors


def test_donors_are_ordered_by_priority_and_skip_self_and_non_numbers():
    result = order_donors(
        entries(
            {
                peer(1).to_bytes(): 1.0,
                peer(2).to_bytes(): 5,
                peer(3).to_bytes(): None,  # switched sharing off
                peer(4).to_bytes(): 3.0,
                peer(5).to_bytes(): 100.0,  # ourselves
                peer(6).to_bytes(): True,  # not a priority
                peer(7).to_bytes(): float("nan"),
                peer(8).to_bytes(): "high",
                b"": 50.0,  # not a peer id
            }
        ),
        own_peer_id=peer(5),
    )
    assert result == [(peer(2), 5.0), (peer(4), 3.0), (peer(1), 1.0)]


def test_donor_ties_are_broken_at_random():
    tied = entries({peer(i).to_bytes(): 1.0 for i in range(1, 5)})
    firsts = {order_donors(tied, None, random.Random(seed))[0][0] for seed in range(40)}
    assert len(firsts) > 1


@pytest.mark.parametrize("value", [None, ValueWithExpiration(None, 1e10), ValueWithExpiration([1, 2], 1e10)])
def test_no_or_malformed_dht_entry_gives_no_donors(value):
    assert order_donors(value, None) == []


def test_assembles_exact_state_across_chunks():
    tensors = [torch.randn(100_000), torch.arange(10), torch.zeros(0), torch.randn(3, 4).to(torch.bfloat16)]
    metadata = {"group_key": "0110", "step": 7}
    got_metadata, got = assemble(state_messages(metadata, tensors), expected=tensors)
    assert got_metadata == metadata
    assert len(got) == len(tensors)
    for mine, theirs in zip(got, tensors):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)


def test_compressed_state_matches_expected_dtype_after_decoding():
    tensors = [torch.randn(1000)]
    _, got = assemble(state_messages({}, tensors, codec=Float16Compression()), expected=tensors)
    assert got[0].dtype == torch.float32 and torch.allclose(got[0], tensors[0], atol=1e-2)


def test_missing_last_tensor_is_refused_when_the_schema_is_known():
    tensors = [torch.randn(10), torch.randn(20)]
    messages = state_messages({}, tensors[:1])
    with pytest.raises(StateDownloadError, match="after 1 of 2 expected tensors"):
        assemble(messages, expected=tensors)


def test_stream_cut_inside_a_tensor_is_refused_even_without_a_schema():
    messages = state_messages({}, [torch.randn(100_000)])  # 7 chunks of 64 KiB
    with pytest.raises(StateDownloadError, match="ended after 3 of the 7 chunks"):
        assemble(messages[:3])


def test_more_chunks_than_announced_are_refused():
    messages = state_messages({}, [torch.randn(100_000)])
    with pytest.raises(StateDownloadError, match="more chunks than the 7"):
        assemble(messages + [averaging_pb2.DownloadData(tensor_part=messages[1].tensor_part)])


def test_wrong_shape_is_refused_before_its_bytes_arrive():
    assembler = StateAssembler([torch.zeros(10)])
    head = state_messages({}, [torch.zeros(11)])[0]
    with pytest.raises(StateDownloadError, match=r"shape \[11\], expected \[10\]"):
        assembler.add(head)


def test_wrong_dtype_is_refused_after_decoding():
    with pytest.raises(StateDownloadError, match="decoded to torch.int64"):
        assemble(state_messages({}, [torch.zeros(10, dtype=torch.int64)]), expected=[torch.zeros(10)])


def test_extra_tensor_is_refused():
    with pytest.raises(StateDownloadError, match="more tensors than the 1 expected"):
        assemble(state_messages({}, [torch.zeros(1), torch.zeros(1)]), expected=[torch.zeros(1)])


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda messages: messages[0].ClearField("metadata"), "first message carries no metadata"),
        (lambda messages: setattr(messages[0], "metadata", b"\xc1\xc1"), "undecodable metadata"),
        (lambda messages: setattr(messages[1], "metadata", b"\x80"), "only the first one may"),
        (lambda messages: messages[1].ClearField("tensor_part"), "carries no tensor chunk"),
    ],
)
def test_malformed_messages_are_refused(mutate, reason):
    messages = state_messages({"a": 1}, [torch.randn(100_000)])
    mutate(messages)
    with pytest.raises(StateDownloadError, match=reason):
        assemble(messages)


def test_continuation_without_a_head_is_refused():
    messages = state_messages({}, [torch.randn(100_000)])
    messages[0].tensor_part.dtype = ""
    with pytest.raises(StateDownloadError, match="never started"):
        assemble(messages)


def test_empty_stream_means_the_donor_does_not_share():
    with pytest.raises(StateDownloadError, match="does not share"):
        StateAssembler().finish()


def test_bytes_beyond_what_the_shape_allows_are_refused_as_they_arrive():
    head = state_messages({}, [torch.zeros(1)])[0]
    head.tensor_part.chunks = 0  # "unknown": only the byte bound can stop it
    assembler = StateAssembler()
    assembler.add(head)
    filler = averaging_pb2.DownloadData(tensor_part={"buffer": bytes(2**16)})
    with pytest.raises(StateDownloadError, match="more than any encoding of it needs"):
        for _ in range(3):
            assembler.add(filler)


def test_total_size_limit():
    with pytest.raises(StateDownloadError, match="exceeds 1000 bytes"):
        assemble(state_messages({}, [torch.zeros(1000)]), max_bytes=1000)


def test_metadata_only_state():
    assert assemble(state_messages({"epoch": 3}, [])) == ({"epoch": 3}, [])


async def test_download_slots_admit_queue_and_refuse():
    slots = DownloadSlots(max_active=1, max_waiting=1, max_wait=10)
    release, entered = asyncio.Event(), []

    async def hold(name):
        async with slots.acquire():
            entered.append(name)
            await release.wait()

    first = asyncio.create_task(hold("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(hold("second"))  # queued
    await asyncio.sleep(0)
    assert (slots.active, slots.waiting) == (1, 1)
    with pytest.raises(DonorBusyError, match="1 more are queued"):
        async with slots.acquire():
            pass
    release.set()
    await asyncio.gather(first, second)
    assert entered == ["first", "second"] and (slots.active, slots.waiting) == (0, 0)


async def test_download_slots_refuse_after_the_queue_wait():
    slots = DownloadSlots(max_active=1, max_waiting=4, max_wait=0.05)
    async with slots.acquire():
        with pytest.raises(DonorBusyError, match="no free download slot within 0.05 s"):
            async with slots.acquire():
                pass
    assert (slots.active, slots.waiting) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue():
    slots = DownloadSlots(max_active=1, max_waiting=1, max_wait=None)
    async with slots.acquire():
        waiter = asyncio.create_task(slots.acquire().__aenter__())
        await asyncio.sleep(0)
        assert slots.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert slots.waiting == 0
    async with slots.acquire():
        assert slots.active == 1
