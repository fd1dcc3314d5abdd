"""A hostile state donor: the downloader's memory and time stay bounded whatever the donor streams."""

import pytest
import torch

from hivemind.averaging.state_download import StateAssembler, StateDownloadError
from hivemind.compression import serialize_torch_tensor
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
