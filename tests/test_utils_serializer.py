import logging
import math

import pytest

from hivemind.utils.serializer import MSGPackDecodeError, MSGPackSerializer, SerializerBase

WIRE_VECTORS = [
    (None, "c0"),
    ("foo", "a3666f6f"),
    (-1, "ff"),
    (True, "c3"),
    (1.5, "cb3ff8000000000000"),
    (float("inf"), "cb7ff0000000000000"),
    (("a", 1), "d64092a16101"),
    (("expert.0.1", "QmPeer"), "c7134092aa6578706572742e302e31a6516d50656572"),
    (["expert.0.1", "QmPeer"], "92aa6578706572742e302e31a6516d50656572"),
]


@pytest.mark.parametrize("obj, hex_encoding", WIRE_VECTORS)
def test_wire_vectors_encode_exactly(obj, hex_encoding):
    assert MSGPackSerializer.dumps(obj).hex() == hex_encoding


@pytest.mark.parametrize("obj, hex_encoding", WIRE_VECTORS)
def test_wire_vectors_decode_with_types(obj, hex_encoding):
    decoded = MSGPackSerializer.loads(bytes.fromhex(hex_encoding))
    assert decoded == obj and type(decoded) is type(obj)


def test_signed_record_payload_vector():
    payload = (bytes(20), b"\xc0", bytes.fromhex("a3616263"), 1700000000.0)
    expected = "c7294094c4140000000000000000000000000000000000000000c401c0c404a3616263cb41d954fc40000000"
    assert MSGPackSerializer.dumps(payload).hex() == expected


def test_nested_tuples_round_trip_as_tuples():
    obj = (1, (2, (3, [4, (5,)])), [(), []], {"k": (b"v", "s")})
    decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps(obj))
    assert decoded == obj
    assert type(decoded[1][1]) is tuple and type(decoded[1][1][1]) is list and type(decoded[1][1][1][1]) is tuple
    assert type(decoded[2][0]) is tuple and type(decoded[2][1]) is list
    assert type(decoded[3]["k"]) is tuple


def test_nested_tuple_is_ext_inside_ext():
    # ("a",) -> ext8(len 3, 0x40, [a]); (("a",),) -> ext8(len 7, 0x40, [that ext])
    assert MSGPackSerializer.dumps(("a",)).hex() == "c7034091a161"
    assert MSGPackSerializer.dumps((("a",),)).hex() == "c7074091c7034091a161"
    assert MSGPackSerializer.dumps(()).hex() == "d44090"


def test_bytes_and_str_stay_distinct():
    decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps([b"abc", "abc", bytearray(b"x")]))
    assert decoded == [b"abc", "abc", b"x"]
    assert type(decoded[0]) is bytes and type(decoded[1]) is str


def test_floats_are_always_float64():
    assert MSGPackSerializer.dumps(0.5)[0] == 0xCB
    assert math.isnan(MSGPackSerializer.loads(MSGPackSerializer.dumps(float("nan"))))


def test_maps_keep_order_and_allow_non_str_keys():
    obj = {3: "three", b"k": 1, ("t", 1): None, "a": [1]}
    decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps(obj))
    assert decoded == obj and list(decoded) == list(obj)


def test_namedtuple_is_encoded_as_tuple():
    from collections import namedtuple

    Point = namedtuple("Point", ["x", "y"])
    assert MSGPackSerializer.loads(MSGPackSerializer.dumps(Point(1, 2))) == (1, 2)


class _Thing:
    def __init__(self, payload: bytes):
        self.payload = payload

    def packb(self) -> bytes:
        return MSGPackSerializer.dumps((self.payload, len(self.payload)))

    @classmethod
    def unpackb(cls, raw: bytes) -> "_Thing":
        payload, length = MSGPackSerializer.loads(raw)
        if len(payload) != length:
            raise ValueError("corrupted _Thing")
        return cls(payload)


def test_ext_serializable_registers_custom_type():
    MSGPackSerializer.ext_serializable(0x7E)(_Thing)
    encoded = MSGPackSerializer.dumps({"thing": _Thing(b"xyz"), "list": [_Thing(b"")]})
    decoded = MSGPackSerializer.loads(encoded)
    assert isinstance(decoded["thing"], _Thing) and decoded["thing"].payload == b"xyz"
    assert isinstance(decoded["list"][0], _Thing)
    assert bytes([0x7E]) in encoded


def test_ext_serializable_rejects_bad_codes_and_types():
    with pytest.raises(ValueError):
        MSGPackSerializer.ext_serializable(0x40)(_Thing)
    with pytest.raises(ValueError):
        MSGPackSerializer.ext_serializable(300)(_Thing)
    with pytest.raises(TypeError):
        MSGPackSerializer.ext_serializable(0x7D)(int)


def test_unknown_ext_code_returns_raw_bytes_with_warning(caplog):
    hivemind_logger = logging.getLogger("hivemind")
    hivemind_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="hivemind"):
            decoded = MSGPackSerializer.loads(bytes.fromhex("d56a0102"))  # fixext2, code 0x6a
    finally:
        hivemind_logger.removeHandler(caplog.handler)
    assert decoded == b"\x01\x02"
    assert any("0x6a" in record.getMessage() for record in caplog.records)


def test_unserializable_object_raises_type_error():
    with pytest.raises(TypeError, match="object"):
        MSGPackSerializer.dumps(object())


@pytest.mark.parametrize(
    "garbage",
    [
        b"",  # empty
        bytes.fromhex("a3666f"),  # truncated str
        bytes.fromhex("c0c0"),  # extra data
        bytes.fromhex("c1"),  # reserved byte
        bytes.fromhex("dbffffffff41"),  # str claiming 4 GiB
        bytes.fromhex("81920101c0"),  # map with a list (unhashable) key
        bytes.fromhex("d540a1"),  # tuple ext whose payload is truncated
        bytes.fromhex("d54001"),  # tuple ext that does not hold an array
    ],
)
def test_malformed_input_raises_value_error(garbage):
    with pytest.raises(ValueError):
        MSGPackSerializer.loads(garbage)
    with pytest.raises(MSGPackDecodeError):
        MSGPackSerializer.loads(garbage)


def test_non_bytes_input_is_rejected():
    with pytest.raises(TypeError):
        MSGPackSerializer.loads("c0")


def test_msgpack_serializer_is_a_serializer():
    assert issubclass(MSGPackSerializer, SerializerBase)
