"""The record validator interface, CompositeValidator ordering/merging, and the record size limit."""

import dataclasses

import pytest

from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordSizeValidator, RecordValidatorBase

RECORD = DHTRecord(key=b"\x01" * 20, subkey=b"\xc0", value=b"\xa3abc", expiration_time=1700000000.0)


class SuffixValidator(RecordValidatorBase):
    """Appends its tag when signing; valid iff the value ends with it; logs every call into a shared list."""

    def __init__(self, tag: bytes, priority: int, log: list):
        self.tag, self._priority, self.log = tag, priority, log

    def validate(self, record):
        self.log.append(("validate", self.tag, record.value))
        return record.value.endswith(self.tag)

    def sign_value(self, record):
        self.log.append(("sign", self.tag, record.value))
        return record.value + self.tag

    def strip_value(self, record):
        return record.value[: -len(self.tag)] if record.value.endswith(self.tag) else record.value

    @property
    def priority(self):
        return self._priority


class MergeableValidator(RecordValidatorBase):
    def __init__(self, names):
        self.names = list(names)

    def validate(self, record):
        return True

    def merge_with(self, other):
        if isinstance(other, MergeableValidator):
            self.names.extend(other.names)
            return True
        return False


def test_dht_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECORD.value = b""


def test_base_validator_defaults():
    class AcceptAll(RecordValidatorBase):
        def validate(self, record):
            return True

    validator = AcceptAll()
    assert validator.priority == 0
    assert validator.sign_value(RECORD) == validator.strip_value(RECORD) == RECORD.value
    assert not validator.merge_with(AcceptAll())


def test_composite_signs_in_ascending_priority():
    log = []
    composite = CompositeValidator([SuffixValidator(b"[high]", 10, log), SuffixValidator(b"[low]", 0, log)])
    assert composite.sign_value(RECORD) == RECORD.value + b"[low][high]"
    assert [entry[:2] for entry in log] == [("sign", b"[low]"), ("sign", b"[high]")]


def test_composite_validates_in_descending_priority_stripping_between():
    log = []
    composite = CompositeValidator([SuffixValidator(b"[low]", 0, log), SuffixValidator(b"[high]", 10, log)])
    assert composite.validate(DHTRecord(RECORD.key, RECORD.subkey, RECORD.value + b"[low][high]", 1.0))
    assert log == [
        ("validate", b"[high]", RECORD.value + b"[low][high]"),
        ("validate", b"[low]", RECORD.value + b"[low]"),
    ]


def test_composite_rejects_when_any_member_rejects():
    log = []
    composite = CompositeValidator([SuffixValidator(b"[low]", 0, log), SuffixValidator(b"[high]", 10, log)])
    assert not composite.validate(DHTRecord(RECORD.key, RECORD.subkey, RECORD.value + b"[high]", 1.0))
    assert not composite.validate(RECORD)


def test_composite_strips_in_descending_priority():
    composite = CompositeValidator([SuffixValidator(b"[low]", 0, []), SuffixValidator(b"[high]", 10, [])])
    signed = DHTRecord(RECORD.key, RECORD.subkey, composite.sign_value(RECORD), RECORD.expiration_time)
    assert composite.strip_value(signed) == RECORD.value


def test_composite_merges_mergeable_validators():
    composite = CompositeValidator([MergeableValidator(["a"])])
    composite.extend([MergeableValidator(["b"]), SuffixValidator(b"[x]", 1, [])])
    assert len(composite) == 2
    assert composite.validators[0].names == ["a", "b"]


def test_composite_extend_flattens_another_composite():
    inner = CompositeValidator([SuffixValidator(b"[x]", 5, [])])
    composite = CompositeValidator([inner, SuffixValidator(b"[y]", 1, [])])
    assert [validator.tag for validator in composite.validators] == [b"[y]", b"[x]"]


def test_composite_rejects_non_validators():
    with pytest.raises(TypeError):
        CompositeValidator(["not a validator"])


def test_empty_composite_accepts_and_keeps_value():
    composite = CompositeValidator()
    assert composite.validate(RECORD) and composite.sign_value(RECORD) == RECORD.value


def test_size_validator_accepts_small_records():
    assert RecordSizeValidator().validate(RECORD)


def test_size_validator_rejects_oversize_value_without_owner_tag():
    validator = RecordSizeValidator(max_value_bytes=10)
    assert validator.validate(DHTRecord(RECORD.key, RECORD.subkey, b"x" * 10, 1.0))
    assert not validator.validate(DHTRecord(RECORD.key, RECORD.subkey, b"x" * 11, 1.0))


def test_size_validator_rejects_oversize_subkey_without_owner_tag():
    validator = RecordSizeValidator(max_subkey_bytes=8)
    assert not validator.validate(DHTRecord(RECORD.key, b"\xc4\x09" + b"s" * 9, RECORD.value, 1.0))


def test_size_validator_leaves_owned_records_to_the_signature_validator():
    validator = RecordSizeValidator(max_value_bytes=10)
    assert validator.validate(DHTRecord(RECORD.key, b"\xc4\x0e[owner:ssh-rsa]", b"x" * 1000, 1.0))


def test_size_validator_default_limits_and_priority():
    validator = RecordSizeValidator()
    assert validator.priority == 100
    assert validator.validate(DHTRecord(RECORD.key, RECORD.subkey, b"x" * (256 * 1024), 1.0))
    assert not validator.validate(DHTRecord(RECORD.key, RECORD.subkey, b"x" * (256 * 1024 + 1), 1.0))
    with pytest.raises(ValueError):
        RecordSizeValidator(max_value_bytes=-1)
