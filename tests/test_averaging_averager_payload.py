"""The averager's wire values: schema hash and gather payload (test vectors from the protocol description)."""

import pytest
import torch

from hivemind.averaging.payload import (
    MalformedGatherError,
    compute_schema_hash,
    decode_gather,
    decode_group_gathered,
    encode_gather,
)
from hivemind.p2p import PeerID
from hivemind.utils.serializer import MSGPackSerializer


def test_schema_hash_vector():
    assert compute_schema_hash([torch.zeros(3)]).hex() == "6abf970b130f97ecae717ff8e9d86818e9d65312"


@pytest.mark.parametrize(
    "other",
    [
        [torch.zeros(4)],
        [torch.zeros(3, dtype=torch.float64)],
        [torch.zeros(3, requires_grad=True)],
        [torch.zeros(1, 3)],
    ],
)
def test_schema_hash_differs_for_other_tensors(other):
    assert compute_schema_hash(other) != compute_schema_hash([torch.zeros(3)])


def test_gather_vectors():
    assert encode_gather(None, 0, None).hex() == "93c000c401c0"
    assert encode_gather(None, 2, 5).hex() == "93c002c40105"
    decoded = decode_gather(bytes.fromhex("93c002c40105"))
    assert (decoded.bandwidth, decoded.mode, decoded.user_object) == (None, 2, 5)


def test_gather_round_trip_with_bandwidth_and_object():
    decoded = decode_gather(encode_gather(12.5, 1, {"epoch": 3, "tags": [1, 2]}))
    assert (decoded.bandwidth, decoded.mode, decoded.user_object) == (12.5, 1, {"epoch": 3, "tags": [1, 2]})


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xc1", "not valid msgpack"),
        (MSGPackSerializer.dumps([None, 0]), "list of 3 items"),
        (MSGPackSerializer.dumps({"a": 1}), "list of 3 items"),
        (MSGPackSerializer.dumps(["fast", 0, b"\xc0"]), "bandwidth must be a number"),
        (MSGPackSerializer.dumps([-1.0, 0, b"\xc0"]), "finite and non-negative"),
        (MSGPackSerializer.dumps([float("nan"), 0, b"\xc0"]), "finite and non-negative"),
        (MSGPackSerializer.dumps([None, 3, b"\xc0"]), "mode must be"),
        (MSGPackSerializer.dumps([None, True, b"\xc0"]), "mode must be"),
        (MSGPackSerializer.dumps([None, 0, "text"]), "msgpack inside bin"),
        (MSGPackSerializer.dumps([None, 0, b"\xc1"]), "user object is not valid msgpack"),
    ],
)
def test_malformed_gather_is_refused_with_its_reason(payload, reason):
    with pytest.raises(MalformedGatherError, match=reason):
        decode_gather(payload)


def test_group_gathered_maps_peers_to_their_objects_and_names_a_bad_peer():
    peers = [PeerID(b"\x12\x20" + bytes([i]) * 32) for i in range(2)]
    infos, gathered = decode_group_gathered(peers, [encode_gather(None, 0, "a"), encode_gather(1.0, 2, "b")])
    assert gathered == {peers[0]: "a", peers[1]: "b"} and [info.mode for info in infos] == [0, 2]
    with pytest.raises(MalformedGatherError, match=str(peers[1])):
        decode_group_gathered(peers, [encode_gather(None, 0, "a"), b"garbage"])
    with pytest.raises(MalformedGatherError, match="2 members but 1 gather"):
        decode_group_gathered(peers, [encode_gather(None, 0, "a")])
