"""Server.create refuses arguments that could not work before it starts anything: a compression that is not a
CompressionType (the server started, and then every client call failed with the server's ValueError), and a single
multiaddr or uid string where a list is expected (the error blamed the multiaddr "/" or the uids 'f', 'f', 'n')."""

import re

import pytest

from hivemind.compression import Float16Compression
from hivemind.moe import Server
from hivemind.proto.runtime_pb2 import CompressionType

PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJEu7jfKTRLFGk6p8D4UHyrUPqVt9z2YsSiA2mhWFM2GF"


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(compression="FLOAT16"), TypeError, r"compression must be a CompressionType.*CompressionType\.FLOAT16"),
        (dict(compression=Float16Compression()), TypeError, r"CompressionType\.FLOAT16"),
        (dict(compression=99), ValueError, r"compression must be one of CompressionType\.NONE, .*got 99"),
        (dict(initial_peers=PEER), TypeError, r"initial_peers must be a list of multiaddrs.*\['" + PEER),
        (dict(expert_uids="ffn.0", num_experts=None), TypeError, r"expert_uids must be a list of uids.*\['ffn.0'\]"),
    ],
    ids=["name", "codec", "unknown", "one-peer", "one-uid"],
)
def test_unworkable_arguments_are_refused_before_anything_starts(overrides, error, message):
    kwargs = dict(num_experts=1, hidden_dim=8, start=False, device="cpu")
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        Server.create(**kwargs)


def test_a_compression_type_value_is_accepted():
    server = Server.create(expert_uids=["ffn.0"], hidden_dim=8, start=False, compression=CompressionType.FLOAT16)
    try:
        assert server.module_backends["ffn.0"].args_schema[0].compression == CompressionType.FLOAT16
    finally:
        server.shutdown()


@pytest.mark.parametrize("pattern", ["ffn.[0:x]", "ffn.[5:2]", "ffn"])
def test_an_unparsable_expert_pattern_is_refused_before_the_dht_starts(monkeypatch, pattern):
    # before: the DHT started first (seconds), and the pattern's ValueError came after it
    import hivemind.moe.server.server as server_module

    def no_dht(*args, **kwargs):
        raise AssertionError("the DHT was started before the expert pattern was checked")

    monkeypatch.setattr(server_module, "DHT", no_dht)
    with pytest.raises(ValueError, match=re.escape(f"expert pattern {pattern!r}")):
        Server.create(num_experts=1, expert_pattern=pattern, hidden_dim=8, start=False)


@pytest.mark.timeout(60)
def test_a_numpy_integer_max_batch_size_is_accepted():
    """hivemind 1.1.12 accepts a numpy integer as max_batch_size (e.g. read from a config with numpy)."""
    import numpy as np

    from hivemind.moe.server.task_pool import TaskPool

    pool = TaskPool(lambda x: x, max_batch_size=np.int64(64), name="numpy_pool")
    assert pool.max_batch_size == 64 and type(pool.max_batch_size) is int
