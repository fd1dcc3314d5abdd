"""Signed DHT records: entries whose key or subkey carries ``[owner:<public key>]`` must be signed by that key."""

from __future__ import annotations

import dataclasses
import re
from typing import List, Optional

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer

__all__ = ["RSASignatureValidator"]

logger = get_logger(__name__)


class RSASignatureValidator(RecordValidatorBase):
    """
    Protects records whose key or subkey contains ``[owner:<OpenSSH RSA public key>]``: such a
    record is valid only if its value ends with ``[signature:<base64 RSA-PSS signature>]`` made by that key over
    ``msgpack((key, subkey, unsigned value, expiration_time))``. Records without an owner tag pass unchanged.

    The writer side signs records that carry the owner tag of one of its own keys (``local_public_key``).

    :param private_key: the key to sign with; by default the process-wide key (RSAPrivateKey.process_wide())
    """

    OWNER_TAG_PREFIX, SIGNATURE_PREFIX, TAG_SUFFIX = b"[owner:", b"[signature:", b"]"
    _OWNER_PATTERN = re.compile(rb"\[owner:(.+?)\]", re.DOTALL)
    _SIGNATURE_PATTERN = re.compile(rb"\[signature:(.+?)\]", re.DOTALL)
    # the tags as templates (replace the placeholder) and the owner tag's pattern, for code that builds or reads them
    PUBLIC_KEY_FORMAT, SIGNATURE_FORMAT = b"[owner:_key_]", b"[signature:_value_]"
    PUBLIC_KEY_REGEX = _OWNER_PATTERN.pattern

    def __init__(self, private_key: Optional[RSAPrivateKey] = None):
        if private_key is None:
            private_key = RSAPrivateKey.process_wide()
        self._private_keys: List[RSAPrivateKey] = [private_key]
        self._owner_tags: List[bytes] = [self._owner_tag_of(private_key)]

    @classmethod
    def _owner_tag_of(cls, private_key: RSAPrivateKey) -> bytes:
        return cls.OWNER_TAG_PREFIX + private_key.get_public_key().to_bytes() + cls.TAG_SUFFIX

    @property
    def local_public_key(self) -> bytes:
        """The owner tag (``b"[owner:ssh-rsa ...]"``) to put into keys or subkeys that this process should sign."""
        return self._owner_tags[0]

    @property
    def priority(self) -> int:
        return 10  # validate and strip before validators that decode the value, sign after them

    def validate(self, record: DHTRecord) -> bool:
        owners = set(self._OWNER_PATTERN.findall(record.key)) | set(self._OWNER_PATTERN.findall(record.subkey))
        if not owners:
            return True
        if len(owners) > 1:
            logger.debug(f"Record {record} names {len(owners)} different owners, refusing it")
            return False
        try:
            public_key = RSAPublicKey.from_bytes(owners.pop())
        except ValueError:
            logger.debug(f"Record {record} has an owner tag that is not an OpenSSH RSA public key")
            return False
        signatures = self._SIGNATURE_PATTERN.findall(record.value)
        if len(signatures) != 1:
            logger.debug(f"Record {record} has {len(signatures)} signatures, exactly one is required")
            return False
        unsigned_record = dataclasses.replace(record, value=self._remove_signatures(record.value))
        return public_key.verify(self.signed_payload(unsigned_record), signatures[0])

    def sign_value(self, record: DHTRecord) -> bytes:
        """Append a signature if the record carries the owner tag of one of this validator's keys."""
        for owner_tag, private_key in zip(self._owner_tags, self._private_keys):
            if owner_tag in record.key or owner_tag in record.subkey:
                signature = private_key.sign(self.signed_payload(record))
                return record.value + self.SIGNATURE_PREFIX + signature + self.TAG_SUFFIX
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        """Remove every ``[signature:...]`` from the value of an owned record; other records are left intact."""
        if self._OWNER_PATTERN.search(record.key) is None and self._OWNER_PATTERN.search(record.subkey) is None:
            return record.value
        return self._remove_signatures(record.value)

    @classmethod
    def _remove_signatures(cls, value: bytes) -> bytes:
        return cls._SIGNATURE_PATTERN.sub(b"", value)

    @staticmethod
    def signed_payload(record: DHTRecord) -> bytes:
        """The bytes that are signed: msgpack of the tuple (key, subkey, value, expiration_time as float64)."""
        return MSGPackSerializer.dumps((record.key, record.subkey, record.value, float(record.expiration_time)))

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Any two signature validators merge: the result signs with the keys of both."""
        if not isinstance(other, RSASignatureValidator):
            return False
        for owner_tag, private_key in zip(other._owner_tags, other._private_keys):
            if owner_tag not in self._owner_tags:
                self._owner_tags.append(owner_tag)
                self._private_keys.append(private_key)
        return True

    def __getstate__(self):
        # hivemind 1.1.12 pickles one key as _private_key and its tag as _local_public_key: written too, so that it
        # reads ours (signing with the first key); all keys of a merged validator are in private_keys
        first_key, first_tag = self._private_keys[0], self._owner_tags[0]
        return {"_private_key": first_key, "_local_public_key": first_tag, "private_keys": self._private_keys}

    def __setstate__(self, state):
        if "private_keys" in state:
            self._private_keys = list(state["private_keys"])
        elif "_private_key" in state:  # written by hivemind 1.1.12
            self._private_keys = [state["_private_key"]]
        else:
            raise TypeError(f"Cannot unpickle an RSASignatureValidator from state with keys {sorted(state)}")
        self._owner_tags = [self._owner_tag_of(private_key) for private_key in self._private_keys]

    def __repr__(self) -> str:
        tag = self.local_public_key[:40]
        return f"{type(self).__name__}({len(self._private_keys)} key(s), local_public_key={tag!r}...)"
