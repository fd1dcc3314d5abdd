import logging
import math
import subprocess
import sys

import msgpack
import pytest

from hivemind.utils import serializer
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
    serializer._warned_ext_codes.discard(0x6A)  # each code is reported once per process
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


# ---------------------------------------------------------------- bounded decoding of hostile input


def _nested_tuple_bytes(depth: int) -> bytes:
    """msgpack of ((...((None,),)...),) with ``depth`` tuples, built from the inside without recursion."""
    encoded = b"\xc0"
    for _ in range(depth):
        encoded = msgpack.packb(msgpack.ExtType(0x40, b"\x91" + encoded))
    return encoded


_DEEP_DECODE_SCRIPT = """
import sys, threading
import msgpack
from hivemind.utils.serializer import MSGPackDecodeError, MSGPackSerializer
threading.stack_size(512 * 1024)  # smaller than the stack a recursive decoder needs for 64 nested tuples
outcomes = []

def decode_all():
    for path in sys.argv[1:]:
        data = open(path, "rb").read()
        try:
            MSGPackSerializer.loads(data)
            outcomes.append("decoded")
        except MSGPackDecodeError as e:
            outcomes.append("refused: " + str(e))

thread = threading.Thread(target=decode_all)
thread.start()
thread.join()
print("\\n".join(outcomes))
"""


@pytest.mark.timeout(60)
def test_deeply_nested_tuples_are_refused_without_crashing(tmp_path):
    # before the bounded decoder, 300 nested tuples overflowed the C stack: the process died with SIGSEGV (139)
    paths = []
    for depth in (64, 300, 3_000, 30_000):
        paths.append(tmp_path / f"tuples_{depth}.bin")
        paths[-1].write_bytes(_nested_tuple_bytes(depth))
    result = subprocess.run(
        [sys.executable, "-c", _DEEP_DECODE_SCRIPT, *map(str, paths)], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, f"decoder process died with exit code {result.returncode}: {result.stderr[-2000:]}"
    outcomes = result.stdout.splitlines()
    assert outcomes[0] == "decoded"  # exactly at the limit, in a thread with a 512 KiB stack
    assert len(outcomes) == 4 and all("nested more than 64 deep" in outcome for outcome in outcomes[1:]), outcomes


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xc0"])  # [x] and {None: x}
def test_plain_nesting_is_bounded(opener):
    limit = MSGPackSerializer.MAX_NESTING_DEPTH
    assert MSGPackSerializer.loads(opener * limit + b"\xc0") is not None
    for depth in (limit + 1, 1000, 1025, 5000):  # msgpack itself refuses more than 1024 levels of plain nesting
        with pytest.raises(MSGPackDecodeError, match="nested"):
            MSGPackSerializer.loads(opener * depth + b"\xc0")


def test_mixed_nesting_counts_every_level():
    obj: object = "leaf"
    for level in range(MSGPackSerializer.MAX_NESTING_DEPTH):
        obj = [[obj], {"k": obj}, (level, obj)][level % 3]  # each adds one level
    encoded = MSGPackSerializer.dumps(obj)
    assert MSGPackSerializer.loads(encoded) == obj
    with pytest.raises(MSGPackDecodeError, match="nested more than 64 deep"):
        MSGPackSerializer.loads(MSGPackSerializer.dumps([obj]))
    with pytest.raises(MSGPackDecodeError, match="nested more than 64 deep"):
        MSGPackSerializer.loads(MSGPackSerializer.dumps((obj,)))


class _Box:
    """A registered ext type whose payload may hold another _Box."""

    def __init__(self, inner):
        self.inner = inner

    def packb(self) -> bytes:
        return MSGPackSerializer.dumps([self.inner])

    @classmethod
    def unpackb(cls, raw: bytes) -> "_Box":
        return cls(MSGPackSerializer.loads(raw)[0])


def test_registered_ext_nesting_is_bounded():
    MSGPackSerializer.ext_serializable(0x7C)(_Box)
    limit = MSGPackSerializer.MAX_EXT_NESTING
    boxed: object = None
    for _ in range(limit):
        boxed = _Box(boxed)
    decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps(boxed))
    for _ in range(limit):
        assert isinstance(decoded, _Box)
        decoded = decoded.inner
    assert decoded is None
    with pytest.raises(MSGPackDecodeError, match="registered ext types"):
        MSGPackSerializer.loads(MSGPackSerializer.dumps(_Box(boxed)))
    raw = b"\xc0"
    for _ in range(3000):  # far beyond the limit: refused before the C stack runs out
        raw = msgpack.packb(msgpack.ExtType(0x7C, b"\x91" + raw))
    with pytest.raises(MSGPackDecodeError, match="registered ext types"):
        MSGPackSerializer.loads(raw)


def test_tuples_deep_inside_containers_keep_types_and_order():
    deep: object = (b"x", 1.5)
    for level in range(40):
        deep = (deep, [level, (level,)]) if level % 2 else {("key", level): deep, "after": (level,)}
    obj = {"value": deep, ("t", (1, (2,))): [deep, (), []], "dup": 0}
    decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps(obj))
    assert decoded == obj and list(decoded) == list(obj)
    assert MSGPackSerializer.dumps(decoded) == MSGPackSerializer.dumps(obj)


def test_equal_tuple_map_keys_merge_like_plain_keys():
    # a map whose two keys decode to the same tuple: the first key keeps its place, the last value wins
    key = MSGPackSerializer.dumps((1, (2,)))
    encoded = b"\x83" + key + b"\x01" + MSGPackSerializer.dumps("mid") + b"\x02" + key + b"\x03"
    decoded = MSGPackSerializer.loads(encoded)
    assert decoded == {(1, (2,)): 3, "mid": 2} and list(decoded) == [(1, (2,)), "mid"]


def test_unhashable_tuple_map_key_is_refused():
    encoded = b"\x81" + MSGPackSerializer.dumps((1, [2])) + b"\xc0"
    with pytest.raises(MSGPackDecodeError):
        MSGPackSerializer.loads(encoded)


def _same_types(left, right) -> bool:
    """Equal, with the same container and scalar types all the way down (tuples stay tuples, bytes stay bytes)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(_same_types(a, b) for a, b in zip(left, right))
    if isinstance(left, dict):
        return list(left) == list(right) and all(_same_types(left[key], right[key]) for key in left)
    return left == right


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev requirement
    st = None

if st is not None:  # a property test where hypothesis is installed; the deterministic cases above otherwise
    _scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=10)
        | st.binary(max_size=10)
    )
    _hashables = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=5)
    _objects = st.recursive(
        _scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=4).map(tuple)
            | st.dictionaries(_hashables, inner, max_size=4)
        ),
        max_leaves=30,
    )

    @settings(max_examples=150, deadline=None)
    @given(obj=_objects)
    def test_any_object_decodes_to_itself_and_encodes_back(obj):
        encoded = MSGPackSerializer.dumps(obj)
        decoded = MSGPackSerializer.loads(encoded)
        assert _same_types(decoded, obj)
        assert MSGPackSerializer.dumps(decoded) == encoded


def test_flood_of_unknown_ext_codes_logs_once_per_code(caplog):
    # a peer's value made of 30k unknown ext objects used to log 30k warnings (~10 s of CPU and ~40 bytes of log per
    # input byte); now each unknown code is reported once
    encoded = b"\xdd" + (30_000).to_bytes(4, "big") + b"\xd4\x6b\x00" * 30_000  # [fixext1 code 0x6b] * 30k
    serializer._warned_ext_codes.discard(0x6B)
    hivemind_logger = logging.getLogger("hivemind")
    hivemind_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="hivemind"):
            for _ in range(3):
                assert MSGPackSerializer.loads(encoded) == [b"\x00"] * 30_000
    finally:
        hivemind_logger.removeHandler(caplog.handler)
    assert len([record for record in caplog.records if "0x6b" in record.getMessage()]) == 1


_PADDING = b"\xc5\x10\x00" + bytes(4096)  # a 4 KiB bin: documents this big have their depth checked by msgpack


def _padded_nesting(kind: str, depth: int, leaf: bytes) -> bytes:
    """``depth`` arrays [padding, [padding, ...leaf]] or maps {None: padding, False: {...leaf}}, over 4 KiB each."""
    opener = b"\x92" + _PADDING if kind == "array" else b"\x82\xc0" + _PADDING + b"\xc2"
    return opener * depth + leaf


@pytest.mark.parametrize("kind", ["array", "map"])
@pytest.mark.parametrize("leaf", [b"\xc0", b"\x90", b"\x80"])  # None, [] and {}: the empty ones add a level
def test_large_documents_are_bounded_at_the_same_depth(kind, leaf):
    limit = MSGPackSerializer.MAX_NESTING_DEPTH
    levels_of_leaf = 0 if leaf == b"\xc0" else 1
    for depth in (limit - 1, limit, limit + 1, 1030):
        encoded = _padded_nesting(kind, depth, leaf)
        if depth + levels_of_leaf <= limit:
            assert MSGPackSerializer.dumps(MSGPackSerializer.loads(encoded)) == encoded
        else:
            with pytest.raises(MSGPackDecodeError, match="nested"):
                MSGPackSerializer.loads(encoded)


def test_large_documents_with_tuples_are_bounded_at_the_same_depth():
    limit = MSGPackSerializer.MAX_NESTING_DEPTH
    for depth in (limit, limit + 1):
        obj: object = None
        for level in range(depth):
            obj = [obj, b"x" * 200] if level % 2 else (obj,)
        encoded = MSGPackSerializer.dumps(obj)
        assert len(encoded) > 4096
        if depth <= limit:
            assert MSGPackSerializer.loads(encoded) == obj
        else:
            with pytest.raises(MSGPackDecodeError, match="nested"):
                MSGPackSerializer.loads(encoded)


def _outcome(encoded: bytes):
    try:
        decoded = MSGPackSerializer.loads(encoded)
    except MSGPackDecodeError:
        return "refused"
    return type(decoded), MSGPackSerializer.dumps(decoded)


def test_wrapped_and_walked_decoding_agree(monkeypatch):
    # big documents may have their depth checked by msgpack (decoded inside wrapper arrays) instead of by a walk;
    # which way is taken only affects speed
    documents = [
        _padded_nesting(kind, depth, leaf)
        for kind in ("array", "map")
        for depth in (1, 63, 64, 65)
        for leaf in (b"\xc0", b"\x90", MSGPackSerializer.dumps((1, [2])), MSGPackSerializer.dumps(((((((),),),),),)))
    ]
    documents += [MSGPackSerializer.dumps([{"k": (i, [i])}, b"x" * 5000]) for i in range(3)]
    documents += [document[:-1] for document in documents[:8]] + [document + b"\xc0" for document in documents[:8]]
    monkeypatch.setattr(serializer, "_worth_wrapping", lambda buf: True)
    wrapped = [_outcome(document) for document in documents]
    monkeypatch.setattr(serializer, "_worth_wrapping", lambda buf: False)
    walked = [_outcome(document) for document in documents]
    assert wrapped == walked
    assert "refused" in walked and any(outcome != "refused" for outcome in walked)
