"""P2P RPC between a peer of the original hivemind 1.1.12 and a peer of ours, both directions."""

import hashlib
import random

import pytest

from .conftest import DIRECTION_IDS, DIRECTIONS, ORIGINAL, OURS
from .harness import RemoteError

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def serving_peers(module_peers):
    """One peer per implementation, each serving the driver's handlers; ours bootstraps from the original."""
    original, ours = module_peers(ORIGINAL, "p2p-original"), module_peers(OURS, "p2p-ours")
    original_info = original.call("p2p_create")
    ours_info = ours.call("p2p_create", initial_peers=original_info["maddrs"])
    for peer in (original, ours):
        peer.call("p2p_serve")
        peer.call("p2p_wait_for_peers", n_peers=1)
    return {ORIGINAL: (original, original_info), OURS: (ours, ours_info)}


def call(serving_peers, caller: str, callee: str, kind: str, numbers):
    peer, _ = serving_peers[caller]
    _, callee_info = serving_peers[callee]
    return peer.call("p2p_call", peer_id=callee_info["peer_id"], kind=kind, numbers=numbers, timeout=10)


@pytest.mark.parametrize("caller, callee", DIRECTIONS, ids=DIRECTION_IDS)
def test_unary_handler_answers_other_implementation(serving_peers, caller, callee):
    assert call(serving_peers, caller, callee, "unary", [7]) == 49
    assert call(serving_peers, caller, callee, "unary", [0]) == 0  # empty protobuf message on the wire


@pytest.mark.parametrize("caller, callee", DIRECTIONS, ids=DIRECTION_IDS)
def test_stream_output_handler_answers_other_implementation(serving_peers, caller, callee):
    assert call(serving_peers, caller, callee, "stream_out", [5]) == [0, 1, 2, 3, 4]
    assert call(serving_peers, caller, callee, "stream_out", [0]) == []  # stream closed with no message


@pytest.mark.parametrize("caller, callee", DIRECTIONS, ids=DIRECTION_IDS)
def test_stream_input_and_output_handler_answers_other_implementation(serving_peers, caller, callee):
    numbers = list(range(1, 101))  # more than the handler's queue of pending requests
    expected = [sum(numbers[: i + 1]) for i in range(len(numbers))]
    assert call(serving_peers, caller, callee, "stream_inout", numbers) == expected


@pytest.mark.parametrize("caller, callee", DIRECTIONS, ids=DIRECTION_IDS)
def test_servicer_stub_calls_namespaced_handlers_of_other_implementation(serving_peers, caller, callee):
    assert call(serving_peers, caller, callee, "stub_unary", [12]) == 144
    assert call(serving_peers, caller, callee, "stub_stream", [3]) == [0, 1, 2]


@pytest.mark.parametrize("caller, callee", DIRECTIONS, ids=DIRECTION_IDS)
def test_handler_errors_reach_other_implementation_with_remote_text(serving_peers, caller, callee):
    with pytest.raises(RemoteError) as unary_error:
        call(serving_peers, caller, callee, "unary", [-3])
    assert unary_error.value.error_type == "P2PHandlerError"
    assert unary_error.value.message == "ValueError('cannot square negative number -3')"  # repr(e) for unary

    callee_id = serving_peers[callee][1]["peer_id"]
    with pytest.raises(RemoteError) as stream_error:
        call(serving_peers, caller, callee, "stream_out", [-3])
    assert stream_error.value.error_type == "P2PHandlerError"
    assert stream_error.value.message == (
        f"Failed to call handler `interop.count` at {callee_id}: cannot count to negative number -3"
    )


def test_streaming_calls_are_awaited_like_in_original(serving_peers):
    """`await p2p.iterate_protobuf_handler(...)` and `await stub.rpc_stream(...)` give async iterators;
    code written for the original must work unchanged with ours."""
    shapes = {}
    for side, target in ((ORIGINAL, OURS), (OURS, ORIGINAL)):
        peer, _ = serving_peers[side]
        shapes[side] = peer.call("p2p_streaming_call_shapes", peer_id=serving_peers[target][1]["peer_id"])
    assert shapes[ORIGINAL] == {"P2P.iterate_protobuf_handler": "coroutine", "stub.rpc_count": "coroutine"}
    assert shapes[OURS] == shapes[ORIGINAL]


@pytest.mark.parametrize(
    "generator, user", DIRECTIONS, ids=["original-file-used-by-ours", "ours-file-used-by-original"]
)
def test_identity_file_of_one_implementation_gives_the_same_peer_id_in_the_other(
    serving_peers, tmp_path, generator, user
):
    path = str(tmp_path / "identity.key")
    generated = serving_peers[generator][0].call("p2p_identity", path=path, generate=True)
    used = serving_peers[user][0].call("p2p_identity", path=path, start=True)
    assert used == {"file_peer_id": generated["file_peer_id"], "p2p_peer_id": generated["file_peer_id"]}


def _expected(seed: int, size: int) -> str:
    return hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest()


@pytest.mark.parametrize("caller, callee", DIRECTIONS, ids=DIRECTION_IDS)
def test_unary_message_just_under_the_size_limit_reaches_other_implementation(serving_peers, caller, callee):
    size = 4 * 1024**2 - 256  # with the call envelope, just below the default persistent_conn_max_msg_size (4 MiB)
    result = serving_peers[caller][0].call(
        "p2p_call_bytes", peer_id=serving_peers[callee][1]["peer_id"], kind="unary", seed=1, total=size
    )
    assert result == {"digest": _expected(1, size), "size": size, "messages": 1}


@pytest.mark.parametrize("caller, callee", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("kind", ["stream_in", "stream_out"])
def test_large_streams_cross_implementations_intact(serving_peers, caller, callee, kind):
    size, chunk = 24 * 1024**2 + 12345, 1024**2  # 25 messages, the last one short
    result = serving_peers[caller][0].call(
        "p2p_call_bytes", peer_id=serving_peers[callee][1]["peer_id"], kind=kind, seed=2, total=size, chunk=chunk
    )
    assert result == {"digest": _expected(2, size), "size": size, "messages": 25}
