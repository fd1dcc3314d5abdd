"""A hostile state donor: what it claims costs the newcomer neither memory nor time beyond what it really sent."""

import logging
import time
import tracemalloc

import pytest
import torch
from test_averaging_state_sharing import (
    assert_state_equal,
    declare,
    dht,
    honest_donor,
    load,
    prefix,
    serve,
    start_peers,
)

from hivemind.averaging.state_download import MAX_MESSAGE_BYTES, StateAssembler, StateDownloadError
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer

__all__ = ["dht", "prefix"]  # the fixtures, used by the tests below


@pytest.mark.parametrize("expected", [[torch.zeros(4)], None], ids=["known schema", "unknown schema"])
def test_a_head_chunk_with_a_million_dimensions_is_refused_at_once(expected):
    """1 MB of dimensions: a tuple of them costs tens of MB, and their product (without a schema to compare with)
    takes minutes of the event loop."""
    head = serialize_torch_tensor(torch.zeros(4))
    head.size[:] = [2**32 - 1] * 200_000
    message = averaging_pb2.DownloadData(metadata=MSGPackSerializer.dumps({}), tensor_part=head)
    assembler = StateAssembler(expected)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(StateDownloadError, match="200000 dimensions"):
            assembler.add(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0 and peak < 2**20


@pytest.mark.timeout(60)
async def test_a_message_larger_than_any_state_message_is_refused_before_it_is_read(dht, p2p_factory, prefix, caplog):
    (liar, good), newcomer = await start_peers(p2p_factory, 2)
    _, good_state = await honest_donor(dht, good, prefix, seed=2, priority=1.0)

    async def huge_metadata(_request, _context):
        metadata = MSGPackSerializer.dumps([None] * (MAX_MESSAGE_BYTES + 1))  # one byte per None: 8 per list item
        yield averaging_pb2.DownloadData(metadata=metadata)

    await serve(liar, prefix, huge_metadata)
    await declare(dht, prefix, liar, 10.0)
    with caplog.at_level(logging.WARNING, logger="hivemind.averaging.state_download"):
        assert_state_equal(await load(newcomer, dht, prefix, expected=good_state[1], timeout=30), good_state)
    failed = [record.getMessage() for record in caplog.records if "failed, trying the next donor" in record.message]
    assert len(failed) == 1 and str(liar.peer_id) in failed[0] and str(MAX_MESSAGE_BYTES) in failed[0], failed


def test_a_flood_of_empty_tensors_is_refused_without_a_schema():
    """Without a schema only the byte count limited a state: a few bytes per empty tensor let a donor make the
    newcomer keep hundreds of millions of tensor objects."""
    empty = serialize_torch_tensor(torch.zeros(0))
    assembler = StateAssembler(None)
    assembler.add(averaging_pb2.DownloadData(metadata=MSGPackSerializer.dumps({}), tensor_part=empty))
    message = averaging_pb2.DownloadData(tensor_part=empty)
    with pytest.raises(StateDownloadError, match="more than 262144 tensors"):
        for _ in range(2**18):
            assembler.add(message)
    assert assembler.num_tensors == 2**18
