"""SchemaValidator with pydantic.v1 schemas (written for hivemind 1.1.x) refuses what hivemind 1.1.12 refuses.

pydantic v1 coerces values (``666`` passes a ``bytes`` field as ``b"666"``); hivemind 1.1.12 refuses such records.
The expected results below were observed by running hivemind 1.1.12 (the interop environment, pydantic 2.12's
``pydantic.v1``) on the same schemas and records; a wider grid of 4576 type/subkey/value combinations agreed in full
when this file was written, these are a representative part of it.
"""

from typing import Any, Dict, List, Optional, Tuple, Union

import pytest

from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator, conbytes
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

p = pytest.importorskip("pydantic.v1")

NAN = float("nan")
REGULAR = None  # the record is a regular value, not a dictionary entry


class Inner(p.BaseModel):
    x: p.StrictInt
    y: float = 0.0


class Loose(p.BaseModel):
    x: int
    s: str = ""


FIELD_TYPES = {
    "bytes": bytes,
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "StrictBytes": p.StrictBytes,
    "StrictStr": p.StrictStr,
    "StrictInt": p.StrictInt,
    "StrictFloat": p.StrictFloat,
    "StrictBool": p.StrictBool,
    "Optional[int]": Optional[int],
    "Optional[bytes]": Optional[bytes],
    "List[int]": List[int],
    "List[bytes]": List[bytes],
    "Tuple[int, ...]": Tuple[int, ...],
    "Tuple[int, str]": Tuple[int, str],
    "conlist(int)": p.conlist(int, min_items=1),
    "conlist(StrictInt)": p.conlist(p.StrictInt, min_items=1),
    "conint(ge=0)": p.conint(ge=0),
    "confloat(ge=0)": p.confloat(ge=0),
    "constr(max_length=3)": p.constr(max_length=3),
    "conbytes(max_length=3)": conbytes(max_length=3),
    "Union[int, str]": Union[int, str],
    "Any": Any,
    "List[Loose]": List[Loose],
    "Dict[bytes, int]": Dict[bytes, int],
    "Dict[str, float]": Dict[str, float],
    "Dict[int, bytes]": Dict[int, bytes],
    "Dict[StrictBytes, StrictInt]": Dict[p.StrictBytes, p.StrictInt],
    "Dict[BytesWithPublicKey, Optional[Inner]]": Dict[BytesWithPublicKey, Optional[Inner]],
    "Dict[bytes, List[int]]": Dict[bytes, List[int]],
    "Dict[str, Loose]": Dict[str, Loose],
}

# (field type, subkey, value, accepted by hivemind 1.1.12)
OBSERVED = [
    ("bytes", REGULAR, 666, False),
    ("bytes", REGULAR, "abc", False),
    ("bytes", REGULAR, b"abc", True),
    ("bytes", REGULAR, b"", True),
    ("bytes", REGULAR, None, False),
    ("bytes", REGULAR, 1.0, False),
    ("str", REGULAR, "abc", True),
    ("str", REGULAR, b"abc", False),
    ("str", REGULAR, 666, False),
    ("str", REGULAR, "", True),
    ("str", REGULAR, 1.5, False),
    ("int", REGULAR, 666, True),
    ("int", REGULAR, -1, True),
    ("int", REGULAR, True, True),
    ("int", REGULAR, 1.0, True),
    ("int", REGULAR, 1.5, False),
    ("int", REGULAR, "3", False),
    ("int", REGULAR, b"3", False),
    ("int", REGULAR, None, False),
    ("int", REGULAR, NAN, False),
    ("float", REGULAR, 1.5, True),
    ("float", REGULAR, 1, True),
    ("float", REGULAR, True, True),
    ("float", REGULAR, NAN, False),
    ("float", REGULAR, "1.5", False),
    ("float", REGULAR, b"3", False),
    ("bool", REGULAR, True, True),
    ("bool", REGULAR, False, True),
    ("bool", REGULAR, 1, True),
    ("bool", REGULAR, 0, True),
    ("bool", REGULAR, 2, False),
    ("bool", REGULAR, "true", False),
    ("bool", REGULAR, 1.0, True),
    ("StrictBytes", REGULAR, b"abc", True),
    ("StrictBytes", REGULAR, "abc", False),
    ("StrictBytes", REGULAR, 666, False),
    ("StrictStr", REGULAR, "abc", True),
    ("StrictStr", REGULAR, b"abc", False),
    ("StrictStr", REGULAR, 1, False),
    ("StrictInt", REGULAR, 1, True),
    ("StrictInt", REGULAR, True, False),
    ("StrictInt", REGULAR, 1.0, False),
    ("StrictInt", REGULAR, "3", False),
    ("StrictFloat", REGULAR, 1.5, True),
    ("StrictFloat", REGULAR, 1, False),
    ("StrictFloat", REGULAR, NAN, False),
    ("StrictFloat", REGULAR, "1.5", False),
    ("StrictBool", REGULAR, True, True),
    ("StrictBool", REGULAR, 1, False),
    ("StrictBool", REGULAR, "true", False),
    ("Optional[int]", REGULAR, None, True),
    ("Optional[int]", REGULAR, 1, True),
    ("Optional[int]", REGULAR, 1.5, False),
    ("Optional[int]", REGULAR, "3", False),
    ("Optional[bytes]", REGULAR, None, True),
    ("Optional[bytes]", REGULAR, b"abc", True),
    ("Optional[bytes]", REGULAR, 666, False),
    ("Optional[bytes]", REGULAR, "abc", False),
    ("List[int]", REGULAR, [1, 2], True),
    ("List[int]", REGULAR, [], True),
    ("List[int]", REGULAR, ["1"], False),
    ("List[int]", REGULAR, [1.5], False),
    ("List[int]", REGULAR, [1.0], True),
    ("List[int]", REGULAR, (1, 2), False),
    ("List[bytes]", REGULAR, [b"x"], True),
    ("List[bytes]", REGULAR, ["a", "b"], False),
    ("List[bytes]", REGULAR, [1, 2], False),
    ("Tuple[int, ...]", REGULAR, (1, 2), True),
    ("Tuple[int, ...]", REGULAR, [1, 2], False),
    ("Tuple[int, ...]", REGULAR, ("1", "a"), False),
    ("Tuple[int, str]", REGULAR, (1, "a"), True),
    ("Tuple[int, str]", REGULAR, ("1", "a"), False),
    ("Tuple[int, str]", REGULAR, (1, 2), False),
    ("conlist(int)", REGULAR, [1, 2], True),
    ("conlist(int)", REGULAR, [], False),
    ("conlist(int)", REGULAR, ["1"], False),
    ("conlist(int)", REGULAR, (1, 2), False),
    ("conlist(StrictInt)", REGULAR, [1, 2], True),
    ("conlist(StrictInt)", REGULAR, [1.0], False),
    ("conlist(StrictInt)", REGULAR, [True], False),
    ("conint(ge=0)", REGULAR, 0, True),
    ("conint(ge=0)", REGULAR, -1, False),
    ("conint(ge=0)", REGULAR, "3", False),
    ("conint(ge=0)", REGULAR, 1.5, False),
    ("confloat(ge=0)", REGULAR, 1.5, True),
    ("confloat(ge=0)", REGULAR, -0.5, False),
    ("confloat(ge=0)", REGULAR, "1.5", False),
    ("confloat(ge=0)", REGULAR, NAN, False),
    ("constr(max_length=3)", REGULAR, "abc", True),
    ("constr(max_length=3)", REGULAR, b"abc", False),
    ("constr(max_length=3)", REGULAR, 666, False),
    ("conbytes(max_length=3)", REGULAR, b"abc", True),
    ("conbytes(max_length=3)", REGULAR, "abc", False),
    ("conbytes(max_length=3)", REGULAR, 666, False),
    ("Union[int, str]", REGULAR, 1, True),
    ("Union[int, str]", REGULAR, "abc", True),
    ("Union[int, str]", REGULAR, "3", False),
    ("Union[int, str]", REGULAR, 1.5, False),
    ("Union[int, str]", REGULAR, b"abc", False),
    ("Any", REGULAR, 666, True),
    ("Any", REGULAR, [1, 2], True),
    ("Any", REGULAR, NAN, False),
    ("Any", REGULAR, None, True),
    ("List[Loose]", REGULAR, [{"x": 1, "s": "a"}], True),
    ("List[Loose]", REGULAR, [{"x": 1}], False),
    ("List[Loose]", REGULAR, [{"x": "1"}], False),
    ("Dict[bytes, int]", REGULAR, [], False),
    ("Dict[bytes, int]", REGULAR, "", False),
    ("Dict[bytes, int]", b"k", 1, True),
    ("Dict[bytes, int]", b"k", 1.0, True),
    ("Dict[bytes, int]", b"k", 1.5, False),
    ("Dict[bytes, int]", b"k", "3", False),
    ("Dict[bytes, int]", b"k", b"3", False),
    ("Dict[bytes, int]", "k", 1, False),
    ("Dict[bytes, int]", "k", 1.0, False),
    ("Dict[bytes, int]", "k", 1.5, False),
    ("Dict[bytes, int]", "k", "3", False),
    ("Dict[bytes, int]", "k", b"3", False),
    ("Dict[bytes, int]", 1, 1, False),
    ("Dict[bytes, int]", 1, 1.0, False),
    ("Dict[bytes, int]", 1, 1.5, False),
    ("Dict[bytes, int]", 1, "3", False),
    ("Dict[bytes, int]", 1, b"3", False),
    ("Dict[str, float]", REGULAR, [], False),
    ("Dict[str, float]", REGULAR, "", False),
    ("Dict[str, float]", "k", 1.5, True),
    ("Dict[str, float]", "k", 1, True),
    ("Dict[str, float]", "k", "1.5", False),
    ("Dict[str, float]", "k", NAN, True),
    ("Dict[str, float]", b"k", 1.5, False),
    ("Dict[str, float]", b"k", 1, False),
    ("Dict[str, float]", b"k", "1.5", False),
    ("Dict[str, float]", b"k", NAN, False),
    ("Dict[int, bytes]", REGULAR, [], False),
    ("Dict[int, bytes]", REGULAR, "", False),
    ("Dict[int, bytes]", 1, b"abc", True),
    ("Dict[int, bytes]", 1, "abc", False),
    ("Dict[int, bytes]", 1, 666, False),
    ("Dict[int, bytes]", 1.0, b"abc", True),
    ("Dict[int, bytes]", 1.0, "abc", False),
    ("Dict[int, bytes]", 1.0, 666, False),
    ("Dict[int, bytes]", True, b"abc", True),
    ("Dict[int, bytes]", True, "abc", False),
    ("Dict[int, bytes]", True, 666, False),
    ("Dict[StrictBytes, StrictInt]", REGULAR, [], False),
    ("Dict[StrictBytes, StrictInt]", REGULAR, "", False),
    ("Dict[StrictBytes, StrictInt]", b"k", 1, True),
    ("Dict[StrictBytes, StrictInt]", b"k", 1.0, False),
    ("Dict[StrictBytes, StrictInt]", b"k", True, False),
    ("Dict[StrictBytes, StrictInt]", "k", 1, False),
    ("Dict[StrictBytes, StrictInt]", "k", 1.0, False),
    ("Dict[StrictBytes, StrictInt]", "k", True, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", REGULAR, [], False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", REGULAR, "", False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"[owner:abc]", None, True),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"[owner:abc]", {"x": 1}, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"[owner:abc]", {"x": 1, "y": 1}, True),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"[owner:abc]", {"x": 1.0, "y": 1}, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"[owner:abc]", {"x": 1, "y": "1"}, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"k", None, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"k", {"x": 1}, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"k", {"x": 1, "y": 1}, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"k", {"x": 1.0, "y": 1}, False),
    ("Dict[BytesWithPublicKey, Optional[Inner]]", b"k", {"x": 1, "y": "1"}, False),
    ("Dict[bytes, List[int]]", REGULAR, [], False),
    ("Dict[bytes, List[int]]", REGULAR, "", False),
    ("Dict[bytes, List[int]]", b"k", [1, 2], True),
    ("Dict[bytes, List[int]]", b"k", ["1"], False),
    ("Dict[bytes, List[int]]", b"k", (1, 2), False),
    ("Dict[str, Loose]", REGULAR, [], False),
    ("Dict[str, Loose]", REGULAR, "", False),
    ("Dict[str, Loose]", "k", {"x": 1, "s": "a"}, True),
    ("Dict[str, Loose]", "k", {"x": 1}, False),
    ("Dict[str, Loose]", "k", {"x": 1, "s": b"a"}, False),
    ("Dict[str, Loose]", "k", {"x": 1, "y": 1}, False),
]


def record(key: str, value, subkey=REGULAR) -> DHTRecord:
    key_id = DHTID.generate(source=key).to_bytes()
    return DHTRecord(key_id, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), 1e10)


def schema_with_field(field_type) -> type:
    return type("Schema", (p.BaseModel,), {"__annotations__": {"field": field_type}})


@pytest.mark.parametrize("type_name, subkey, value, expected", OBSERVED, ids=repr)
def test_v1_field_accepts_what_the_original_accepts(type_name, subkey, value, expected):
    validator = SchemaValidator(schema_with_field(FIELD_TYPES[type_name]), allow_extra_keys=False)
    assert validator.validate(record("field", value, subkey)) is expected


class Normalizing(p.BaseModel):
    stripped: p.constr(strip_whitespace=True) = ""
    lowered: p.constr(to_lower=True) = ""
    doubled: int = 0
    required_elsewhere: str  # missing whenever another field is checked: that alone refuses nothing

    @p.validator("doubled")
    def double(cls, value):
        return value * 2


class Aliased(p.BaseModel):
    value: int = p.Field(alias="other_name")


class AliasedByName(p.BaseModel):
    value: int = p.Field(alias="other_name")

    class Config:
        allow_population_by_field_name = True


class RootRefuses(p.BaseModel):
    value: int = 0

    @p.root_validator
    def refuse(cls, values):
        raise ValueError("refused by the model")


class Outer(p.BaseModel):
    strict_inner: Dict[bytes, Inner]


@pytest.mark.parametrize(
    "schema, key, value, expected",
    [
        (Normalizing, "stripped", " a ", False),
        (Normalizing, "stripped", "a", True),
        (Normalizing, "lowered", "A", False),
        (Normalizing, "lowered", "a", True),
        (Normalizing, "doubled", 2, False),
        (Normalizing, "doubled", 0, True),
        (Normalizing, "required_elsewhere", "x", True),
        (Aliased, "value", 1, False),  # v1 looks the field up by its alias only
        (Aliased, "other_name", 1, False),  # the DHT key is the field name, so this key is not declared
        (AliasedByName, "value", 1, False),  # the original raises KeyError here; we refuse
        (RootRefuses, "value", 1, False),
    ],
    ids=repr,
)
def test_v1_validators_and_aliases_behave_as_in_the_original(schema, key, value, expected):
    assert SchemaValidator(schema, allow_extra_keys=False).validate(record(key, value)) is expected


def test_v1_nested_model_entry_with_dropped_extra_field_is_refused():
    validator = SchemaValidator(Outer, allow_extra_keys=False)
    assert validator.validate(record("strict_inner", {"x": 1, "y": 2.0}, subkey=b"k"))
    assert not validator.validate(record("strict_inner", {"x": 1, "y": 2.0, "extra": 3}, subkey=b"k"))
