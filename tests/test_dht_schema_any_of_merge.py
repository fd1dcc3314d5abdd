"""A validator unpickled from hivemind 1.1.12's layout judges a key that several of its schemas share as 1.1.12 does
(one of them accepting is enough: which one declared the key is not recorded). A schema merged into it later guards
that key in full: its refusal still refuses, whichever side the merge is made from, also after our pickle (e.g. the
one that takes the validators to a DHT process started with spawn)."""

import pickle

import pydantic
import pytest
from pydantic import StrictInt, StrictStr

from hivemind.dht import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


class CountsSchema(pydantic.BaseModel):
    value: StrictInt


class NamesSchema(pydantic.BaseModel):
    value: StrictStr


class PositiveCountsSchema(pydantic.BaseModel):
    value: pydantic.conint(ge=0, strict=True)


def validator_in_the_layout_of_the_original() -> SchemaValidator:
    """counts_value and names_value, each guarded by CountsSchema or NamesSchema (1.1.12 does not record which)."""
    merged = SchemaValidator(CountsSchema, prefix="counts", allow_extra_keys=False)
    assert merged.merge_with(SchemaValidator(NamesSchema, prefix="names", allow_extra_keys=False))
    state = merged.__getstate__()
    loaded = SchemaValidator.__new__(SchemaValidator)
    loaded.__setstate__({key: state[key] for key in ("_schemas", "_key_id_to_field_name", "_allow_extra_keys")})
    return loaded


def record(key: str, value) -> DHTRecord:
    key_id = DHTID.generate(source=key).to_bytes()
    return DHTRecord(key_id, MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(value), get_dht_time() + 60)


CASES = [
    ("counts_value", 5, True),
    ("counts_value", -1, False),  # refused by the schema merged later
    ("counts_value", "x", False),  # a value of the other prefix's schema: refused by the schema merged later
    ("names_value", "x", True),  # 1.1.12's judgement of the keys it does not touch is kept
    ("names_value", 7, True),
    ("names_value", 1.5, False),
]


@pytest.mark.timeout(30)
def test_a_schema_merged_into_a_validator_of_the_original_still_refuses():
    into_loaded = validator_in_the_layout_of_the_original()
    assert into_loaded.merge_with(SchemaValidator(PositiveCountsSchema, prefix="counts", allow_extra_keys=False))
    loaded_into_ours = SchemaValidator(PositiveCountsSchema, prefix="counts", allow_extra_keys=False)
    assert loaded_into_ours.merge_with(validator_in_the_layout_of_the_original())
    validators = [into_loaded, loaded_into_ours]
    validators += [pickle.loads(pickle.dumps(validator)) for validator in validators]
    for key, value, expected in CASES:
        assert [validator.validate(record(key, value)) for validator in validators] == [expected] * 4, (key, value)


@pytest.mark.timeout(120)
def test_a_spawned_dht_keeps_the_schema_merged_into_a_validator_of_the_original():
    dht = DHT(
        start=True,
        start_method="spawn",
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[
            validator_in_the_layout_of_the_original(),
            SchemaValidator(PositiveCountsSchema, prefix="counts", allow_extra_keys=False),
        ],
    )
    try:
        expiration = get_dht_time() + 60
        assert not dht.store("counts_value", "x", expiration)
        assert not dht.store("counts_value", -1, expiration)
        assert dht.store("counts_value", 5, expiration)
        assert dht.store("names_value", 7, expiration)
        assert dht.get("counts_value", latest=True).value == 5
    finally:
        dht.shutdown()
