"""Typed DHT keys: a pydantic (v2) model declares which keys exist and what their values must look like."""

from __future__ import annotations

import re
from typing import Annotated, Any, Dict, List, Optional, Pattern, Tuple, Type, Union

import pydantic
from pydantic import AfterValidator

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer

__all__ = ["SchemaValidator", "conbytes", "BytesWithPublicKey", "RSASignatureValidator"]

logger = get_logger(__name__)

_REGULAR_VALUE_SUBKEY = MSGPackSerializer.dumps(None)  # b"\xc0": the record is a regular value, not a dict entry


def conbytes(*, regex: Optional[Union[bytes, str, Pattern[bytes]]] = None, **kwargs) -> Any:
    """
    A constrained bytes type: ``pydantic.conbytes(**kwargs)`` (``min_length``, ``max_length``, ``strict``) that
    must also match ``regex`` at its start (``re.match``, as pydantic v1's regex constraint did).
    """
    constrained = pydantic.conbytes(**kwargs)
    if regex is None:
        return constrained
    if isinstance(regex, str):
        regex = regex.encode()
    pattern = regex if isinstance(regex, re.Pattern) else re.compile(regex)

    def check_pattern(value: bytes) -> bytes:
        if pattern.match(value) is None:
            raise ValueError(f"{value[:64]!r} does not match the pattern {pattern.pattern!r}")
        return value

    return Annotated[constrained, AfterValidator(check_pattern)]


# bytes that contain an ``[owner:<public key>]`` tag, e.g. subkeys that only their owner may write (with signatures)
BytesWithPublicKey = conbytes(regex=re.compile(rb".*\[owner:.+?\]", re.DOTALL))


class SchemaValidator(RecordValidatorBase):
    """
    Checks the values of the DHT keys declared by a pydantic v2 model: field ``f`` guards the key
    ``f"{prefix}_{f}"`` (or ``f`` without prefix). Values are checked in strict mode, so nothing is coerced: a float
    ``3.0`` for an ``int`` field is refused. A dictionary entry (subkey ``s``) is checked as ``{f: {s: value}}``, so
    dictionary fields should be typed ``Dict[SubkeyType, ValueType]``; a plain dict stored as a regular value under
    a schema key is refused (dictionaries are stored entry by entry).

    Each field is validated on its own (other fields count as absent), so field validators run but model-level
    validators do not. Records are seen after signature stripping (priority 0 < RSASignatureValidator's 10).

    :param schema: a ``pydantic.BaseModel`` subclass (pydantic v2; ``pydantic.v1`` models are not supported)
    :param allow_extra_keys: if False, keys that no schema declares are refused
    :param prefix: namespace prepended to field names, e.g. the experiment name
    """

    def __init__(self, schema: Type[pydantic.BaseModel], allow_extra_keys: bool = True, prefix: Optional[str] = None):
        if not (isinstance(schema, type) and issubclass(schema, pydantic.BaseModel)):
            raise TypeError(
                f"schema must be a pydantic v2 BaseModel subclass, got {schema!r}; "
                f"pydantic.v1 models are not supported, declare the schema with `from pydantic import BaseModel`"
            )
        self.allow_extra_keys = allow_extra_keys
        self._fields_by_key: Dict[bytes, List[Tuple[Type[pydantic.BaseModel], str]]] = {}
        for name in schema.model_fields:
            dht_key = name if prefix is None else f"{prefix}_{name}"
            key_id = DHTID.generate(source=dht_key).to_bytes()
            self._fields_by_key.setdefault(key_id, []).append((schema, name))

    def validate(self, record: DHTRecord) -> bool:
        guards = self._fields_by_key.get(record.key)
        if guards is None:
            return self.allow_extra_keys
        try:
            value = MSGPackSerializer.loads(record.value)
            if record.subkey == _REGULAR_VALUE_SUBKEY:
                if isinstance(value, dict):
                    logger.debug(f"Schema key {record.key.hex()} got a dict as a regular value; store it by subkey")
                    return False
                field_value = value
            else:
                field_value = {MSGPackSerializer.loads(record.subkey): value}
        except (ValueError, TypeError) as e:  # undecodable bytes, unhashable subkeys
            logger.debug(f"Cannot decode the record {record} for schema validation: {e!r}")
            return False
        return all(self._field_accepts(model, name, field_value) for model, name in guards)

    @staticmethod
    def _field_accepts(model: Type[pydantic.BaseModel], name: str, field_value: Any) -> bool:
        field = model.model_fields[name]
        input_name = field.alias or name
        try:
            model.model_validate({input_name: field_value}, strict=True)
            return True
        except pydantic.ValidationError as e:
            # the other fields are legitimately absent; any other error concerns this field
            errors = [
                error
                for error in e.errors()
                if not (error["type"] == "missing" and len(error["loc"]) == 1 and error["loc"][0] != input_name)
            ]
            if errors:
                logger.debug(f"Field {name!r} of {model.__name__} refuses {field_value!r:.100}: {errors}")
            return not errors
        except Exception as e:  # e.g. a model validator that assumes all fields are present: refuse, do not crash
            logger.debug(f"Validating field {name!r} of {model.__name__} raised {e!r}")
            return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Schema validators merge into one: a key declared by several schemas must satisfy all of them."""
        if not isinstance(other, SchemaValidator):
            return False
        for key_id, guards in other._fields_by_key.items():
            self._fields_by_key.setdefault(key_id, []).extend(guards)
        self.allow_extra_keys = self.allow_extra_keys or other.allow_extra_keys
        return True

    def __repr__(self) -> str:
        fields = sorted({name for guards in self._fields_by_key.values() for _, name in guards})
        return f"{type(self).__name__}(fields={fields}, allow_extra_keys={self.allow_extra_keys})"
