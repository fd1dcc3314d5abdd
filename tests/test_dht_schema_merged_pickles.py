"""A merged SchemaValidator (several schemas with prefixes, e.g. DHT(record_validators=[...]) merges them) judges the
same after a pickle, such as the one that takes it to a DHT process started with spawn, even where two of its schemas
share a field name: each key stays guarded by the schema that declared it."""

import pickle

import pydantic
import pytest
from pydantic import StrictInt, StrictStr

from hivemind.dht import DHT
from hivemind.dht.schema import SchemaValidator
from hivemind.utils.timed_storage import get_dht_time


class CountsSchema(pydantic.BaseModel):
    value: StrictInt


class NamesSchema(pydantic.BaseModel):
    value: StrictStr


def merged_validator() -> SchemaValidator:
    validator = SchemaValidator(CountsSchema, prefix="counts", allow_extra_keys=False)
    assert validator.merge_with(SchemaValidator(NamesSchema, prefix="names", allow_extra_keys=False))
    return validator


@pytest.mark.timeout(30)
def test_a_merged_validator_judges_alike_after_a_pickle():
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    validator = merged_validator()
    loaded = pickle.loads(pickle.dumps(validator))
    for key, value, expected in [("counts_value", 5, True), ("counts_value", "x", False), ("names_value", "x", True)]:
        record = DHTRecord(
            DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(value), 1e10
        )
        assert validator.validate(record) is expected and loaded.validate(record) is expected, (key, value)


@pytest.mark.timeout(120)
def test_a_spawned_dht_with_merged_schemas_stores_the_values_each_schema_allows():
    dht = DHT(
        start=True,
        start_method="spawn",
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[
            SchemaValidator(CountsSchema, prefix="counts", allow_extra_keys=False),
            SchemaValidator(NamesSchema, prefix="names", allow_extra_keys=False),
        ],
    )
    try:
        expiration = get_dht_time() + 60
        assert dht.store("counts_value", 5, expiration)
        assert dht.store("names_value", "x", expiration)
        assert not dht.store("counts_value", "x", expiration)
        assert dht.get("counts_value", latest=True).value == 5
        assert dht.get("names_value", latest=True).value == "x"
    finally:
        dht.shutdown()


@pytest.mark.timeout(30)
def test_a_merged_validator_in_the_layout_of_the_original_judges_as_the_original():
    """1.1.12's pickle of a validator merged from schemas with prefixes that share a field name (counts_value,
    names_value) guards each key by both schemas: 1.1.12 accepts a value one of them accepts, and so must ours
    (all of them refused every honest value), also after a pickle of ours and a merge."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    state = merged_validator().__getstate__()
    original_layout = {key: state[key] for key in ("_schemas", "_key_id_to_field_name", "_allow_extra_keys")}
    loaded = SchemaValidator.__new__(SchemaValidator)
    loaded.__setstate__(original_layout)
    again = pickle.loads(pickle.dumps(loaded))
    merged = SchemaValidator(CountsSchema, prefix="other", allow_extra_keys=False)
    assert merged.merge_with(loaded)
    for key, value, expected in [("counts_value", 5, True), ("names_value", "x", True), ("names_value", 1.5, False)]:
        record = DHTRecord(
            DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(value), 1e10
        )
        assert [v.validate(record) for v in (loaded, again, merged)] == [expected] * 3, (key, value)
