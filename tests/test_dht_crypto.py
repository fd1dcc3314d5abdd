"""RSASignatureValidator: owner tags, signatures, stripping and merging."""

import dataclasses
import pickle

import pytest

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


@pytest.fixture(scope="module")
def keys():
    return RSAPrivateKey(), RSAPrivateKey()


@pytest.fixture(scope="module")
def alice(keys):
    return RSASignatureValidator(keys[0])


@pytest.fixture(scope="module")
def bob(keys):
    return RSASignatureValidator(keys[1])


def owned_record(validator, value=b"\xa3abc", subkey_prefix=b"user"):
    subkey = MSGPackSerializer.dumps(subkey_prefix + validator.local_public_key)
    return DHTRecord(DHTID.generate("key").to_bytes(), subkey, value, get_dht_time() + 10)


def signed(validator, record):
    return dataclasses.replace(record, value=validator.sign_value(record))


def test_signed_payload_vector():
    record = DHTRecord(key=b"\x00" * 20, subkey=b"\xc0", value=bytes.fromhex("a3616263"), expiration_time=1700000000.0)
    expected = "c7294094c4140000000000000000000000000000000000000000c401c0c404a3616263cb41d954fc40000000"
    assert RSASignatureValidator.signed_payload(record).hex() == expected


def test_signed_payload_encodes_int_expiration_as_float64():
    record = DHTRecord(key=b"\x00" * 20, subkey=b"\xc0", value=b"\xa3abc", expiration_time=1700000000)
    assert RSASignatureValidator.signed_payload(record).endswith(bytes.fromhex("cb41d954fc40000000"))


def test_local_public_key_is_an_owner_tag_with_openssh_key(alice, keys):
    assert alice.local_public_key == b"[owner:" + keys[0].get_public_key().to_bytes() + b"]"
    assert alice.local_public_key.startswith(b"[owner:ssh-rsa AAAA")


def test_priority_is_10(alice):
    assert alice.priority == 10


def test_records_without_owner_tag_pass_unsigned_and_unchanged(alice):
    record = DHTRecord(DHTID.generate("key").to_bytes(), b"\xc0", b"\xa3abc", get_dht_time() + 10)
    assert alice.sign_value(record) == record.value
    assert alice.validate(record)
    assert alice.strip_value(record) == record.value


def test_own_records_are_signed_with_a_signature_suffix(alice):
    record = owned_record(alice)
    value = alice.sign_value(record)
    assert value.startswith(record.value + b"[signature:") and value.endswith(b"]")


def test_signed_record_validates_and_strips_to_original_value(alice, bob):
    record = signed(alice, owned_record(alice))
    assert alice.validate(record) and bob.validate(record)  # anyone can verify
    assert alice.strip_value(record) == b"\xa3abc"


def test_owner_tag_in_key_is_protected_too(alice):
    record = DHTRecord(b"prefix" + alice.local_public_key, b"\xc0", b"\xa3abc", get_dht_time() + 10)
    assert not alice.validate(record)
    assert alice.validate(signed(alice, record))


def test_unsigned_owned_record_is_rejected(alice, bob):
    assert not bob.validate(owned_record(alice))


def test_others_records_are_not_signed(alice, bob):
    record = owned_record(alice)
    assert bob.sign_value(record) == record.value


def test_record_signed_by_another_key_is_rejected(alice, bob, keys):
    record = owned_record(alice)
    forged_signature = keys[1].sign(RSASignatureValidator.signed_payload(record))
    forged = dataclasses.replace(record, value=record.value + b"[signature:" + forged_signature + b"]")
    assert not alice.validate(forged)


@pytest.mark.parametrize("field", ["value", "expiration_time", "subkey"])
def test_tampered_signed_record_is_rejected(alice, field):
    record = signed(alice, owned_record(alice))
    if field == "value":
        tampered = dataclasses.replace(record, value=b"\xa3xyz" + record.value[4:])
    elif field == "expiration_time":
        tampered = dataclasses.replace(record, expiration_time=record.expiration_time + 1)
    else:
        tampered = dataclasses.replace(record, subkey=MSGPackSerializer.dumps(b"other" + alice.local_public_key))
    assert not alice.validate(tampered)


def test_double_signed_record_is_rejected(alice):
    once = signed(alice, owned_record(alice))
    twice = signed(alice, once)
    assert not alice.validate(twice)


def test_record_with_two_different_owners_is_rejected(alice, bob):
    subkey = MSGPackSerializer.dumps(alice.local_public_key + bob.local_public_key)
    record = DHTRecord(DHTID.generate("key").to_bytes(), subkey, b"\xa3abc", get_dht_time() + 10)
    assert not alice.validate(signed(alice, record))
    assert not bob.validate(signed(bob, record))


def test_malformed_owner_key_is_rejected(alice):
    subkey = MSGPackSerializer.dumps(b"[owner:ssh-rsa not-a-key]")
    record = DHTRecord(DHTID.generate("key").to_bytes(), subkey, b"\xa3abc[signature:AAAA]", get_dht_time() + 10)
    assert not alice.validate(record)


def test_garbage_signature_is_rejected(alice):
    record = owned_record(alice)
    assert not alice.validate(dataclasses.replace(record, value=record.value + b"[signature:!!not base64!!]"))


def test_validators_merge_and_sign_with_both_keys(keys):
    composite = CompositeValidator([RSASignatureValidator(keys[0]), RSASignatureValidator(keys[1])])
    assert len(composite) == 1
    merged = composite.validators[0]
    for private_key in keys:
        validator = RSASignatureValidator(private_key)
        record = signed(merged, owned_record(validator))
        assert validator.validate(record)


def test_merge_with_refuses_other_validator_kinds(alice):
    from hivemind.dht.validation import RecordSizeValidator

    assert not alice.merge_with(RecordSizeValidator())


def test_default_key_is_process_wide():
    assert RSASignatureValidator().local_public_key == RSASignatureValidator().local_public_key
    process_key = RSAPrivateKey.process_wide().get_public_key().to_bytes()
    assert RSASignatureValidator().local_public_key == b"[owner:" + process_key + b"]"


def test_validator_survives_pickling(alice):
    restored = pickle.loads(pickle.dumps(alice))
    assert restored.local_public_key == alice.local_public_key
    assert alice.validate(signed(restored, owned_record(alice)))


def test_composite_with_signatures_round_trips_through_msgpack(alice):
    composite = CompositeValidator([alice])
    record = owned_record(alice, value=MSGPackSerializer.dumps({"loss": 0.5}))
    wire_record = dataclasses.replace(record, value=composite.sign_value(record))
    assert composite.validate(wire_record)
    assert MSGPackSerializer.loads(composite.strip_value(wire_record)) == {"loss": 0.5}
