"""SchemaValidator on pydantic v2 models: strict types, dictionary fields, prefixes, merging, conbytes."""

import dataclasses
from typing import Dict, List, Tuple

import pydantic
import pytest
from pydantic import BaseModel, Field, StrictInt, StrictStr, field_validator

from hivemind.dht.crypto import RSASignatureValidator as CryptoRSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, RSASignatureValidator, SchemaValidator, conbytes
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

OWNER = b"[owner:ssh-rsa AAAAB3NzaC1yc2E]"


class SampleSchema(BaseModel):
    experiment_name: StrictStr
    n_batches: Dict[BytesWithPublicKey, StrictInt]
    learning_rate: float
    coordinates: Tuple[int, int]
    tags: List[str]


def record(key: str, value, subkey=None, prefix=None) -> DHTRecord:
    key_id = DHTID.generate(key if prefix is None else f"{prefix}_{key}").to_bytes()
    return DHTRecord(key_id, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), 1e10)


@pytest.fixture(scope="module")
def validator():
    return SchemaValidator(SampleSchema, allow_extra_keys=False)


def test_schema_module_reexports_signature_validator():
    assert RSASignatureValidator is CryptoRSASignatureValidator


def test_value_of_the_declared_type_is_accepted(validator):
    assert validator.validate(record("experiment_name", "demo"))
    assert validator.validate(record("coordinates", (1, 2)))
    assert validator.validate(record("tags", ["a", "b"]))


def test_float_for_strict_int_field_is_rejected(validator):
    assert validator.validate(record("n_batches", 3, subkey=b"peer" + OWNER))
    assert not validator.validate(record("n_batches", 3.0, subkey=b"peer" + OWNER))


def test_no_coercion_even_for_plain_types(validator):
    assert not validator.validate(record("experiment_name", b"demo"))
    assert not validator.validate(record("learning_rate", "0.1"))
    assert not validator.validate(record("coordinates", [1, 2]))  # a list is not a tuple
    assert not validator.validate(record("tags", ("a", "b")))  # a tuple is not a list


def test_dictionary_entries_are_checked_as_field_subkey_value(validator):
    assert validator.validate(record("n_batches", 7, subkey=b"peer" + OWNER))
    assert not validator.validate(record("n_batches", 7, subkey=b"no owner tag"))
    assert not validator.validate(record("n_batches", "7", subkey=b"peer" + OWNER))


def test_plain_dict_as_regular_value_is_rejected(validator):
    assert not validator.validate(record("n_batches", {b"peer" + OWNER: 7}))


def test_subkey_entry_for_a_non_dictionary_field_is_rejected(validator):
    assert not validator.validate(record("experiment_name", "demo", subkey=b"sub"))


def test_undecodable_value_is_rejected(validator):
    bad = dataclasses.replace(record("experiment_name", "demo"), value=b"\xc1garbage")
    assert not validator.validate(bad)


def test_unhashable_subkey_is_rejected(validator):
    assert not validator.validate(record("n_batches", 7, subkey=[1, 2]))


def test_unknown_keys_follow_allow_extra_keys(validator):
    assert not validator.validate(record("unknown", 1))
    assert SchemaValidator(SampleSchema).validate(record("unknown", 1))


def test_prefix_namespaces_the_keys():
    prefixed = SchemaValidator(SampleSchema, allow_extra_keys=False, prefix="run1")
    assert prefixed.validate(record("experiment_name", "demo", prefix="run1"))
    assert not prefixed.validate(record("experiment_name", 5, prefix="run1"))
    assert not prefixed.validate(record("experiment_name", "demo"))  # not declared without the prefix


def test_field_validators_and_constraints_apply():
    class Constrained(BaseModel):
        epoch: StrictInt = Field(ge=0)
        name: StrictStr

        @field_validator("name")
        @classmethod
        def lowercase_only(cls, value):
            if value != value.lower():
                raise ValueError("name must be lowercase")
            return value

    validator = SchemaValidator(Constrained)
    assert validator.validate(record("epoch", 3)) and not validator.validate(record("epoch", -1))
    assert validator.validate(record("name", "abc")) and not validator.validate(record("name", "ABC"))


def test_merged_schemas_check_all_keys_and_or_allow_extra_keys():
    class First(BaseModel):
        alpha: StrictInt

    class Second(BaseModel):
        beta: StrictStr

    composite = CompositeValidator([SchemaValidator(First, allow_extra_keys=False)])
    composite.extend([SchemaValidator(Second, allow_extra_keys=True)])
    assert len(composite) == 1
    assert composite.validate(record("alpha", 1)) and not composite.validate(record("alpha", "1"))
    assert composite.validate(record("beta", "b")) and not composite.validate(record("beta", 2))
    assert composite.validate(record("gamma", 3))  # allow_extra_keys: False OR True


def test_key_declared_by_two_merged_schemas_must_satisfy_both():
    class Loose(BaseModel):
        value: float

    class Tight(BaseModel):
        value: StrictInt

    merged = SchemaValidator(Loose)
    assert merged.merge_with(SchemaValidator(Tight))
    assert merged.validate(record("value", 1)) and not merged.validate(record("value", 1.5))


def test_non_model_schema_is_rejected_with_type_error():
    with pytest.raises(TypeError, match="pydantic"):
        SchemaValidator(dict)


def test_pydantic_v1_schemas_of_hivemind_1_1_still_work():
    pydantic_v1 = pytest.importorskip("pydantic.v1")

    class LegacySchema(pydantic_v1.BaseModel):
        epoch: pydantic_v1.StrictInt
        peers: Dict[BytesWithPublicKey, pydantic_v1.StrictFloat]

    validator = SchemaValidator(LegacySchema, allow_extra_keys=False)
    assert validator.validate(record("epoch", 3)) and not validator.validate(record("epoch", 3.0))
    assert validator.validate(record("peers", 0.5, subkey=b"peer" + OWNER))
    assert not validator.validate(record("peers", 0.5, subkey=b"no owner tag"))
    assert not validator.validate(record("peers", {b"peer" + OWNER: 0.5}))
    assert not validator.validate(record("unknown", 1))


def test_field_alias_is_the_input_name_and_field_name_the_dht_key():
    class Aliased(BaseModel):
        step_count: StrictInt = Field(alias="stepCount")

    validator = SchemaValidator(Aliased, allow_extra_keys=False)
    assert validator.validate(record("step_count", 5)) and not validator.validate(record("step_count", "5"))
    assert not validator.validate(record("stepCount", 5))


def test_model_validator_that_needs_all_fields_refuses_instead_of_crashing():
    class NeedsAll(BaseModel):
        low: StrictInt
        high: StrictInt

        @pydantic.model_validator(mode="before")
        @classmethod
        def ordered(cls, data):
            if data["low"] > data["high"]:  # KeyError when validated field by field
                raise ValueError("low > high")
            return data

    assert not SchemaValidator(NeedsAll).validate(record("low", 1))


def test_conbytes_regex_and_length():
    class Model(BaseModel):
        data: conbytes(regex=rb"id:\d+", max_length=8)

    assert Model.model_validate({"data": b"id:42"}, strict=True).data == b"id:42"
    for bad in (b"id:x", b"xid:42", b"id:123456"):
        with pytest.raises(pydantic.ValidationError):
            Model.model_validate({"data": bad}, strict=True)


def test_bytes_with_public_key_requires_owner_tag_anywhere():
    class Model(BaseModel):
        data: BytesWithPublicKey

    assert Model(data=b"prefix" + OWNER + b"suffix").data.endswith(b"suffix")
    for bad in (b"[owner:]no tag", "a str" + OWNER.decode()):
        with pytest.raises(pydantic.ValidationError):
            Model(data=bad)


def test_schema_validates_signed_records_after_signature_is_stripped():
    signer = RSASignatureValidator(RSAPrivateKey())
    composite = CompositeValidator([SchemaValidator(SampleSchema, allow_extra_keys=False), signer])
    entry = record("n_batches", 5, subkey=b"peer" + signer.local_public_key)
    signed = dataclasses.replace(entry, value=composite.sign_value(entry))
    assert signed.value != entry.value and composite.validate(signed)
    wrong_type = record("n_batches", 5.0, subkey=b"peer" + signer.local_public_key)
    assert not composite.validate(dataclasses.replace(wrong_type, value=composite.sign_value(wrong_type)))


def test_conbytes_rejects_unsupported_constraints():
    conbytes(strict=True)
    with pytest.raises(TypeError, match="to_lower"):
        conbytes(to_lower=True)
