"""Validation of DHT records: the validator interface, a priority-ordered composite, and a record size limit."""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from typing import Iterable, List

__all__ = ["DHTRecord", "RecordValidatorBase", "CompositeValidator", "RecordSizeValidator"]


@dataclasses.dataclass(frozen=True)
class DHTRecord:
    """One DHT entry as validators see it."""

    key: bytes  # the 20-byte key id, DHTID.to_bytes()
    subkey: bytes  # the msgpack-encoded subkey; b"\\xc0" (msgpack of None) for a regular value
    value: bytes  # the msgpack-encoded value, plus any suffixes that validators appended when signing
    expiration_time: float  # absolute, Unix seconds


class RecordValidatorBase(ABC):
    """
    A rule that DHT records must satisfy. Writers call ``sign_value`` before sending a record; storing peers and
    readers call ``validate`` and then ``strip_value`` to remove what ``sign_value`` added.
    """

    @abstractmethod
    def validate(self, record: DHTRecord) -> bool:
        """Whether the record is acceptable (storing peers refuse it, readers treat it as not found otherwise)."""

    def sign_value(self, record: DHTRecord) -> bytes:
        """The value to send for this record (e.g. with a signature appended); by default, unchanged."""
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        """Undo ``sign_value``: the value for msgpack decoding or for the next validator; by default unchanged."""
        return record.value

    @property
    def priority(self) -> int:
        """Validators with higher priority validate and strip first, and sign last."""
        return 0

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Absorb ``other`` into this validator if their kinds merge; True if merged (then ``other`` is dropped)."""
        return False


class CompositeValidator(RecordValidatorBase):
    """
    Several validators acting as one: ``sign_value`` applies them in ascending priority, ``validate`` and
    ``strip_value`` in descending priority, each one seeing the value as stripped by the ones before it.
    """

    def __init__(self, validators: Iterable[RecordValidatorBase] = ()):
        self._validators: List[RecordValidatorBase] = []
        self.extend(validators)

    @property
    def validators(self) -> List[RecordValidatorBase]:
        """The member validators in ascending priority."""
        return list(self._validators)

    def extend(self, validators: Iterable[RecordValidatorBase]) -> None:
        """Add validators; each is merged into an existing one that accepts it (``merge_with``) or appended."""
        for new_validator in validator_list(validators):
            if isinstance(new_validator, CompositeValidator):
                self.extend(new_validator.validators)
                continue
            if not any(existing.merge_with(new_validator) for existing in self._validators):
                self._validators.append(new_validator)
        self._validators.sort(key=lambda validator: validator.priority)  # stable: equal priorities keep their order

    def validate(self, record: DHTRecord) -> bool:
        """Every member must accept the record; each one sees the value stripped by the higher-priority ones."""
        current = record
        for member in self._validators[::-1]:
            if member.validate(current):
                current = _with_value(current, member.strip_value(current))
            else:
                return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        current = record
        for member in self._validators:  # the lowest priority signs first, its suffix ends up innermost
            current = _with_value(current, member.sign_value(current))
        return current.value

    def strip_value(self, record: DHTRecord) -> bytes:
        current = record
        for member in self._validators[::-1]:
            current = _with_value(current, member.strip_value(current))
        return current.value

    def __len__(self) -> int:
        return len(self._validators)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._validators})"


def _with_value(record: DHTRecord, value: bytes) -> DHTRecord:
    return dataclasses.replace(record, value=value)


_OWNER_TAG = re.compile(rb"\[owner:.+?\]", re.DOTALL)


class RecordSizeValidator(RecordValidatorBase):
    """
    Rejects records without an ``[owner:...]`` tag whose value or subkey is too large, so that an anonymous peer
    cannot fill others' storage with huge entries. Owned records are left to the signature validator.

    Defaults: values up to 256 KiB (64x the largest record hivemind itself writes: expert and averaging
    announcements are well under 4 KiB), subkeys up to 4 KiB. The limits apply to the bytes on the wire (after any
    signature suffix was added), checked before any other validator (priority 100) as the check is the cheapest.

    :param max_value_bytes: the largest accepted value, in bytes
    :param max_subkey_bytes: the largest accepted msgpack-encoded subkey, in bytes
    """

    DEFAULT_MAX_VALUE_BYTES = 256 * 1024
    DEFAULT_MAX_SUBKEY_BYTES = 4 * 1024

    def __init__(
        self, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, max_subkey_bytes: int = DEFAULT_MAX_SUBKEY_BYTES
    ):
        if max_value_bytes < 0 or max_subkey_bytes < 0:
            raise ValueError(f"size limits must be non-negative, got {max_value_bytes=}, {max_subkey_bytes=}")
        self.max_value_bytes, self.max_subkey_bytes = max_value_bytes, max_subkey_bytes

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) <= self.max_value_bytes and len(record.subkey) <= self.max_subkey_bytes:
            return True
        return _OWNER_TAG.search(record.key) is not None or _OWNER_TAG.search(record.subkey) is not None

    @property
    def priority(self) -> int:
        return 100

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_value_bytes={self.max_value_bytes}, max_subkey_bytes={self.max_subkey_bytes})"
        )


def validator_list(validators: Iterable[RecordValidatorBase]) -> List[RecordValidatorBase]:
    """``validators`` as a list; TypeError (saying what to pass) for a single validator, or a non-validator."""
    if isinstance(validators, RecordValidatorBase):
        raise TypeError(
            f"record_validators must be a list of validators, got a single {type(validators).__name__}: "
            f"pass [validator]"
        )
    result = list(validators)
    for validator in result:
        if isinstance(validator, type) and issubclass(validator, RecordValidatorBase):
            raise TypeError(f"got the class {validator.__name__}: pass an instance, {validator.__name__}()")
        if not isinstance(validator, RecordValidatorBase):
            raise TypeError(f"expected a RecordValidatorBase, got {type(validator).__name__}")
    return result
