"""A replica (P2P.replicate) keeps its own persistent_conn_max_msg_size (4 MiB by default) while the daemon it shares
may accept larger unary messages (the owner's P2P.create(persistent_conn_max_msg_size=...)). A message above the
replica's limit fails that one call with an error naming the limit; the replica and its handlers keep working."""

import pytest

from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

pytestmark = pytest.mark.timeout(60)

LARGE_LIMIT = 16 * 1024**2
LARGE = 8 * 1024**2  # above the replica's 4 MiB, below the daemons' 16 MiB


def with_bytes(size: int, message_type=runtime_pb2.ExpertRequest):
    return message_type(tensors=[runtime_pb2.Tensor(buffer=b"x" * size)])


async def size_of(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=str(len(request.tensors[0].buffer)).encode())


async def make_bytes(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    return with_bytes(int(request.uid), runtime_pb2.ExpertResponse)


@pytest.fixture
async def owner_caller_replica(p2p_factory):
    owner = await p2p_factory(persistent_conn_max_msg_size=LARGE_LIMIT)
    caller = await p2p_factory(
        persistent_conn_max_msg_size=LARGE_LIMIT, initial_peers=await owner.get_visible_maddrs()
    )
    replica = await P2P.replicate(owner.daemon_listen_maddr)
    try:
        yield owner, caller, replica
    finally:
        await replica.shutdown()


async def test_a_request_above_the_replicas_limit_fails_that_call_only(owner_caller_replica):
    owner, caller, replica = owner_caller_replica
    await replica.add_protobuf_handler("size_of", size_of, runtime_pb2.ExpertRequest)
    small = with_bytes(100)
    answer = await caller.call_protobuf_handler(owner.peer_id, "size_of", small, runtime_pb2.ExpertResponse)
    assert answer.metadata == b"100"

    with pytest.raises(P2PHandlerError, match="persistent_conn_max_msg_size"):
        await caller.call_protobuf_handler(
            owner.peer_id, "size_of", with_bytes(LARGE), runtime_pb2.ExpertResponse, timeout=20
        )

    assert replica.is_alive  # before: the replica's connection to p2pd was dropped, and its handlers with it
    answer = await caller.call_protobuf_handler(owner.peer_id, "size_of", small, runtime_pb2.ExpertResponse)
    assert answer.metadata == b"100"


async def test_a_response_above_the_replicas_limit_fails_that_call_only(owner_caller_replica):
    owner, caller, replica = owner_caller_replica
    await caller.add_protobuf_handler("make_bytes", make_bytes, runtime_pb2.ExpertRequest)
    request = runtime_pb2.ExpertRequest(uid=str(LARGE))
    with pytest.raises(P2PDaemonError, match="persistent_conn_max_msg_size"):
        await replica.call_protobuf_handler(
            caller.peer_id, "make_bytes", request, runtime_pb2.ExpertResponse, timeout=20
        )
    assert replica.is_alive  # before: the replica's connection to p2pd was dropped
    request = runtime_pb2.ExpertRequest(uid="10")
    answer = await replica.call_protobuf_handler(caller.peer_id, "make_bytes", request, runtime_pb2.ExpertResponse)
    assert answer.tensors[0].buffer == b"x" * 10


async def test_a_replica_given_the_owners_limit_takes_large_messages(owner_caller_replica):
    owner, caller, _ = owner_caller_replica
    replica = await P2P.replicate(owner.daemon_listen_maddr, persistent_conn_max_msg_size=LARGE_LIMIT)
    try:
        assert replica.persistent_conn_max_msg_size == LARGE_LIMIT
        await replica.add_protobuf_handler("size_of", size_of, runtime_pb2.ExpertRequest)
        answer = await caller.call_protobuf_handler(
            owner.peer_id, "size_of", with_bytes(LARGE), runtime_pb2.ExpertResponse
        )
        assert answer.metadata == str(LARGE).encode()
    finally:
        await replica.shutdown()
    with pytest.raises(TypeError, match="persistent_conn_max_msg_size"):
        await P2P.replicate(owner.daemon_listen_maddr, persistent_conn_max_msg_size="16MiB")


async def test_the_replicas_of_a_dht_take_the_limit_it_was_started_with(p2p_factory):
    caller = await p2p_factory(persistent_conn_max_msg_size=LARGE_LIMIT)
    await caller.add_protobuf_handler("size_of", size_of, runtime_pb2.ExpertRequest)
    dht = DHT(
        start=True,
        initial_peers=await caller.get_visible_maddrs(),  # not a DHT peer: the daemon only connects to it
        ensure_bootstrap_success=False,
        persistent_conn_max_msg_size=LARGE_LIMIT,
    )
    try:
        replica = await dht.replicate_p2p()
        assert replica.persistent_conn_max_msg_size == LARGE_LIMIT  # before: 4 MiB, refusing the request below
        answer = await replica.call_protobuf_handler(
            caller.peer_id, "size_of", with_bytes(LARGE), runtime_pb2.ExpertResponse
        )
        assert answer.metadata == str(LARGE).encode()
    finally:
        dht.shutdown()
