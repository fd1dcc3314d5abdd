"""Runs SchemaValidator over a grid of pydantic.v1 field types, subkeys and values; prints one JSON object.

The same file runs under both implementations (public API only): {"version", "file", "results": {case: bool}}.
"""

import json
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import pydantic.v1 as p

import hivemind
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator, conbytes
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer


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
    "Optional[StrictInt]": Optional[p.StrictInt],
    "List[int]": List[int],
    "List[bytes]": List[bytes],
    "List[str]": List[str],
    "List[float]": List[float],
    "Tuple[int, ...]": Tuple[int, ...],
    "Tuple[int, str]": Tuple[int, str],
    "conlist(int)": p.conlist(int, min_items=1),
    "conlist(StrictInt)": p.conlist(p.StrictInt, min_items=1),
    "conint(ge=0)": p.conint(ge=0),
    "conint(strict)": p.conint(strict=True),
    "confloat(ge=0)": p.confloat(ge=0),
    "constr(max_length=3)": p.constr(max_length=3),
    "conbytes(max_length=3)": conbytes(max_length=3),
    "Union[int, str]": Union[int, str],
    "Any": Any,
    "Loose": Loose,
    "Optional[Inner]": Optional[Inner],
    "List[Loose]": List[Loose],
    "Dict[bytes, int]": Dict[bytes, int],
    "Dict[str, float]": Dict[str, float],
    "Dict[int, bytes]": Dict[int, bytes],
    "Dict[bool, bytes]": Dict[bool, bytes],
    "Dict[StrictBytes, StrictInt]": Dict[p.StrictBytes, p.StrictInt],
    "Dict[BytesWithPublicKey, Optional[Inner]]": Dict[BytesWithPublicKey, Optional[Inner]],
    "Dict[bytes, List[int]]": Dict[bytes, List[int]],
    "Dict[str, Loose]": Dict[str, Loose],
}
NAN = float("nan")
VALUES = [
    666, -1, 0, 1, 2, True, False, 1.0, 1.5, -0.5, NAN, "abc", "3", "1.5", "true", "", b"abc", b"3", b"", None,
    [1, 2], [], ["1"], [b"x"], [1.0], [1.5], [True], [NAN], ["a", "b"], (1, 2), (1, "a"), ("1", "a"),
    {"x": 1}, {"x": 1.0}, {"x": "1"}, {"x": True}, {"x": 1, "y": 1}, {"x": 1, "y": "1"}, {"x": 1, "s": "a"},
    {"x": 1, "s": b"a"}, {"x": 1, "s": 5}, {"x": 1.0, "y": 1}, [{"x": 1}], [{"x": "1"}], [{"x": 1, "s": "a"}],
]  # fmt: skip
SUBKEYS = [b"k", "k", 1, True, 1.0, b"[owner:abc]", "[owner:abc]", (1, 2)]


def main() -> None:
    key_id = DHTID.generate(source="field").to_bytes()
    results = {}
    for type_name, field_type in FIELD_TYPES.items():
        schema = type("Schema", (p.BaseModel,), {"__annotations__": {"field": field_type}})
        validator = SchemaValidator(schema, allow_extra_keys=False)
        subkeys = [None] + (SUBKEYS if type_name.startswith("Dict") else [])
        for subkey in subkeys:
            for value in VALUES:
                record = DHTRecord(key_id, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), 1e10)
                try:
                    outcome = bool(validator.validate(record))
                except Exception as e:  # the original raises for some inputs; counts as not accepted
                    outcome = f"raised {type(e).__name__}"
                results[f"{type_name} | {subkey!r} | {value!r}"] = outcome
    json.dump({"version": hivemind.__version__, "file": hivemind.__file__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
