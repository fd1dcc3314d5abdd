"""Typed DHT keys: a pydantic (v2) model declares which keys exist and what their values must look like."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Pattern, Tuple, Type, Union

import pydantic
from pydantic_core import core_schema

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer

__all__ = ["SchemaValidator", "conbytes", "BytesWithPublicKey", "RSASignatureValidator"]

logger = get_logger(__name__)

_REGULAR_VALUE_SUBKEY = MSGPackSerializer.dumps(None)  # b"\xc0": the record is a regular value, not a dict entry

# a guard of a key: fields (checker, field name) of which one must accept the value; one field, except in validators
# unpickled from 1.1.12's layout, which does not record which of the schemas that share a field name declared the key
_Guard = Tuple[Tuple["_FieldChecker", str], ...]


class _ConstrainedBytes:
    """
    Base of the types made by :func:`conbytes`: usable as a field type in pydantic v2 models and, for schemas
    written for hivemind 1.1.x, in ``pydantic.v1`` models. Only ``bytes`` pass (no coercion from str).
    """

    min_length: Optional[int] = None
    max_length: Optional[int] = None
    pattern: Optional[Pattern[bytes]] = None

    @classmethod
    def _check(cls, value: Any) -> bytes:
        if not isinstance(value, bytes):
            raise ValueError(f"expected bytes, got {type(value).__name__}")
        if cls.min_length is not None and len(value) < cls.min_length:
            raise ValueError(f"expected at least {cls.min_length} bytes, got {len(value)}")
        if cls.max_length is not None and len(value) > cls.max_length:
            raise ValueError(f"expected at most {cls.max_length} bytes, got {len(value)}")
        if cls.pattern is not None and cls.pattern.match(value) is None:
            raise ValueError(f"{value[:64]!r} does not match the pattern {cls.pattern.pattern!r}")
        return value

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:  # pydantic v2
        return core_schema.no_info_after_validator_function(cls._check, core_schema.bytes_schema(strict=True))

    @classmethod
    def __get_validators__(cls):  # pydantic v1
        yield cls._check


def conbytes(
    *,
    regex: Optional[Union[bytes, str, Pattern[bytes]]] = None,
    min_length: Optional[int] = None,
    max_length: Optional[int] = None,
    **kwargs: Any,
) -> Type[bytes]:
    """
    A bytes type for schema fields, with optional length bounds and a ``regex`` that must match at the start of the
    value (``re.match``, as pydantic v1's constraint did). Works in pydantic v2 and ``pydantic.v1`` models alike.
    Values are always strict (only ``bytes`` pass), so ``strict=`` is accepted and has no further effect.
    """
    unsupported = set(kwargs) - {"strict"}
    if unsupported:
        raise TypeError(f"conbytes supports regex, min_length, max_length and strict; got {sorted(unsupported)}")
    if isinstance(regex, str):
        regex = regex.encode()
    pattern = regex if regex is None or isinstance(regex, re.Pattern) else re.compile(regex)
    namespace = dict(min_length=min_length, max_length=max_length, pattern=pattern)
    return type("ConstrainedBytesValue", (_ConstrainedBytes,), namespace)


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

    :param schema: a ``pydantic.BaseModel`` subclass. Schemas written for hivemind 1.1.x as ``pydantic.v1`` models
      are accepted too and judged as hivemind 1.1 judges them: a value passes only if v1 validation leaves it equal
      to what was sent (no coercion: ``666`` for ``bytes`` or ``"3"`` for ``int`` is refused, ``1.0`` for ``int``
      passes); values of aliased v1 fields are always refused.
    :param allow_extra_keys: if False, keys that no schema declares are refused
    :param prefix: namespace prepended to field names, e.g. the experiment name
    """

    def __init__(self, schema: Type[Any], allow_extra_keys: bool = True, prefix: Optional[str] = None):
        self.allow_extra_keys = allow_extra_keys
        self._fields_by_key: Dict[bytes, List[_Guard]] = {}  # a value must pass every guard of its key
        checker = _FieldChecker.for_schema(schema)
        for name in checker.input_names:
            dht_key = name if prefix is None else f"{prefix}_{name}"
            key_id = DHTID.generate(source=dht_key).to_bytes()
            self._fields_by_key.setdefault(key_id, []).append(((checker, name),))

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
        return all(any(checker.accepts(name, field_value) for checker, name in guard) for guard in guards)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Schema validators merge into one: a key declared by several schemas must satisfy all of them."""
        if not isinstance(other, SchemaValidator):
            return False
        for key_id, guards in other._fields_by_key.items():
            self._fields_by_key.setdefault(key_id, []).extend(guards)
        self.allow_extra_keys = self.allow_extra_keys or other.allow_extra_keys
        return True

    def __getstate__(self) -> dict:
        # hivemind 1.1.12's layout (its pickles load here, and ours there): the schemas and which key is which field;
        # plus which schema guards which key (_guards, ignored by 1.1.12), so that a merged validator judges alike
        # after a pickle (e.g. to a DHT process started with spawn) even if two of its schemas share a field name
        fields_by_key = {
            key_id: [field for guard in guards for field in guard] for key_id, guards in self._fields_by_key.items()
        }
        schemas = list(
            {id(checker.schema): checker.schema for fields in fields_by_key.values() for checker, _ in fields}.values()
        )
        index_of = {id(schema): index for index, schema in enumerate(schemas)}
        return {
            "_schemas": schemas,
            "_key_id_to_field_name": {key_id: fields[0][1] for key_id, fields in fields_by_key.items()},
            "_allow_extra_keys": self.allow_extra_keys,
            "_guards": {
                key_id: [[(index_of[id(checker.schema)], name) for checker, name in guard] for guard in guards]
                for key_id, guards in self._fields_by_key.items()
            },
        }

    def __setstate__(self, state: dict) -> None:
        self.allow_extra_keys = state["_allow_extra_keys"]
        self._fields_by_key = {}
        checkers = [_FieldChecker.for_schema(schema) for schema in state["_schemas"]]
        if "_guards" in state:  # ours: a guard is a list of (schema index, field name), or one such pair (before)
            any_of = set(state.get("_any_of", ()))  # keys whose pairs formed one guard (before)
            for key_id, guards in state["_guards"].items():
                guards = [[guard] if isinstance(guard[0], int) else guard for guard in guards]
                if key_id in any_of:
                    guards = [[field for guard in guards for field in guard]]
                self._fields_by_key[key_id] = [tuple((checkers[i], name) for i, name in guard) for guard in guards]
            return
        # hivemind 1.1.12's: which of the schemas that have the key's field declared it is not recorded (schemas
        # merged with different prefixes may share a field name): as in 1.1.12, one of them accepting is enough
        for key_id, name in state["_key_id_to_field_name"].items():
            fields = tuple((checker, name) for checker in checkers if name in checker.input_names)
            if fields:
                self._fields_by_key[key_id] = [fields]

    def __repr__(self) -> str:
        fields = sorted({name for guards in self._fields_by_key.values() for guard in guards for _, name in guard})
        return f"{type(self).__name__}(fields={fields}, allow_extra_keys={self.allow_extra_keys})"


class _FieldChecker:
    """Validates one field of a pydantic v2 (strict mode) or pydantic.v1 model, other fields counting as absent."""

    def __init__(self, schema: Type[Any], input_names: Dict[str, str], is_v1: bool):
        self.schema, self.is_v1 = schema, is_v1
        self.input_names = input_names  # field name -> key in the input dict (its alias, if any)

    @classmethod
    def for_schema(cls, schema: Any) -> _FieldChecker:
        if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
            names = {name: field.alias or name for name, field in schema.model_fields.items()}
            return cls(schema, names, is_v1=False)
        pydantic_v1 = _import_pydantic_v1()
        if pydantic_v1 is not None and isinstance(schema, type) and issubclass(schema, pydantic_v1.BaseModel):
            return cls(schema, {name: name for name in schema.__fields__}, is_v1=True)
        raise TypeError(f"schema must be a pydantic BaseModel subclass (v2, or pydantic.v1), got {schema!r}")

    def accepts(self, name: str, field_value: Any) -> bool:
        input_name = self.input_names[name]
        try:
            if self.is_v1:
                return self._accepts_v1(name, field_value)
            self.schema.model_validate({input_name: field_value}, strict=True)
            return True
        except Exception as e:
            if not callable(getattr(e, "errors", None)):  # not a ValidationError, e.g. a model validator that
                logger.debug(f"Validating {name!r} of {self.schema.__name__} raised {e!r}")  # assumes all fields
                return False
            # the other fields are legitimately absent; any other error concerns this field
            errors = [error for error in e.errors() if not self._is_other_field_missing(error, input_name)]
            if errors:
                logger.debug(f"Field {name!r} of {self.schema.__name__} refuses {field_value!r:.100}: {errors}")
            return not errors

    def _accepts_v1(self, name: str, field_value: Any) -> bool:
        """
        pydantic v1 coerces (666 passes as ``bytes``, ``"3"`` as ``int``) and has no strict mode. A value passes only
        if validation leaves it as it came: the validated value must compare equal to the input, so coerced values
        (``b"666"`` is not ``666``), normalised ones (stripped, lower-cased, missing defaults of a nested model
        filled in) and NaN are refused, while equal values of another numeric type (``1.0`` for ``int``, ``1`` for
        ``float``, ``True`` for ``int``) pass. This is what hivemind 1.1 accepts for the same schemas.
        """
        field = self.schema.__fields__[name]
        if field.alias != name:  # hivemind 1.1 never accepts a value for an aliased v1 field; neither do we
            logger.debug(f"Field {name!r} of {self.schema.__name__} has an alias; v1 schemas refuse its values")
            return False
        values, _, error = _import_pydantic_v1().validate_model(self.schema, {name: field_value})
        if error is not None:
            errors = [e for e in error.errors() if not self._is_other_field_missing(e, name)]
            if errors:
                logger.debug(f"Field {name!r} of {self.schema.__name__} refuses {field_value!r:.100}: {errors}")
                return False
        if name not in values or not values[name] == field_value:
            logger.debug(f"Field {name!r} of {self.schema.__name__} would coerce {field_value!r:.100}; refused")
            return False
        return True

    def _is_other_field_missing(self, error: Dict[str, Any], input_name: str) -> bool:
        missing_type = "value_error.missing" if self.is_v1 else "missing"
        return error.get("type") == missing_type and len(error["loc"]) == 1 and error["loc"][0] != input_name


def _import_pydantic_v1():
    try:
        import pydantic.v1 as pydantic_v1
    except ImportError:  # pragma: no cover - pydantic builds without the v1 compatibility layer
        return None
    return pydantic_v1
