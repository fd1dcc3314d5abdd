"""What a donor sends for the 0-d tensors of its state (e.g. Adam's step counters): hivemind 1.1.12 cannot decode a
0-d MEANSTD_16BIT tensor, so a donor whose state_compression picks ScaledFloat16Compression for one sends it
uncompressed (4 bytes instead of 10); the other tensors keep their codec."""

import pytest
import torch
from test_averaging_state_sharing import DecentralizedAverager, serve, sharing_for, start_peers

import hivemind
from hivemind.compression import (
    CompressionInfo,
    RoleAdaptiveCompression,
    ScaledFloat16Compression,
    deserialize_torch_tensor,
)
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import averaging_pb2, runtime_pb2

STATE = [torch.randn(2, 300, generator=torch.Generator().manual_seed(1)), torch.tensor(7.0), torch.tensor(-3.5)]


@pytest.fixture(scope="module")
def dht():
    with hivemind.DHT(start=True) as instance:
        yield instance


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "codec",
    [ScaledFloat16Compression(), RoleAdaptiveCompression(default=ScaledFloat16Compression())],
    ids=["meanstd", "adaptive-meanstd"],
)
async def test_scalars_of_a_meanstd_compressed_state_are_sent_uncompressed(p2p_factory, dht, codec):
    (donor,), client = await start_peers(p2p_factory, 1)
    sharing = sharing_for(dht, donor, "scalars", ({}, STATE), state_compression=codec)
    await serve(donor, "scalars", sharing.rpc_download_state)
    handler = get_handle_name("scalars", DecentralizedAverager.__name__, "rpc_download_state")
    stream = await client.iterate_protobuf_handler(
        donor.peer_id, handler, averaging_pb2.DownloadRequest(), averaging_pb2.DownloadData
    )
    heads = [message.tensor_part async for message in stream if message.tensor_part.dtype]
    assert [head.compression for head in heads] == [
        runtime_pb2.CompressionType.MEANSTD_16BIT,
        runtime_pb2.CompressionType.NONE,
        runtime_pb2.CompressionType.NONE,
    ]
    for head, sent in zip(heads[1:], STATE[1:]):
        assert len(head.buffer) == 4 and torch.equal(deserialize_torch_tensor(head), sent)
    # the codec itself still encodes a scalar, as before (e.g. for peers of ours)
    scalar = STATE[1]
    assert ScaledFloat16Compression().compress(scalar, CompressionInfo.from_tensor(scalar)).compression == (
        runtime_pb2.CompressionType.MEANSTD_16BIT
    )
