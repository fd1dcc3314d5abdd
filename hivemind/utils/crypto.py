"""RSA keys used to sign DHT records and authorize requests: 2048-bit, RSA-PSS/SHA-256, base64."""

from __future__ import annotations

import base64
import binascii
import os
import threading
from typing import Optional

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ["RSAPrivateKey", "RSAPublicKey"]

RSA_KEY_SIZE = 2048
RSA_PUBLIC_EXPONENT = 65537
_PSS_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_MAX_SIGNATURE_LENGTH = 4096  # base64 of a 16384-bit signature; anything longer is garbage


class RSAPrivateKey:
    """A 2048-bit RSA private key (e = 65537); a new random key unless wrapping an existing one."""

    _process_wide_key: Optional[RSAPrivateKey] = None
    _process_wide_key_lock = threading.Lock()

    def __init__(self, private_key: Optional[rsa.RSAPrivateKey] = None):
        if private_key is None:
            private_key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_SIZE)
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise TypeError(f"expected a cryptography RSAPrivateKey, got {type(private_key).__name__}")
        self._private_key = private_key
        self._public_key: Optional[RSAPublicKey] = None

    @classmethod
    def process_wide(cls) -> RSAPrivateKey:
        """The key shared by everything in this process (created on first use)."""
        key = cls._process_wide_key
        if key is None:
            with cls._process_wide_key_lock:
                key = cls._process_wide_key = cls._process_wide_key or cls()
        return key

    def sign(self, data: bytes) -> bytes:
        """RSA-PSS (MGF1-SHA256, SHA-256, maximum salt) signature of ``data``, base64-encoded."""
        signature = self._private_key.sign(bytes(data), _PSS_PADDING, hashes.SHA256())
        return base64.b64encode(signature)

    def get_public_key(self) -> RSAPublicKey:
        if self._public_key is None:
            self._public_key = RSAPublicKey(self._private_key.public_key())
        return self._public_key

    def to_bytes(self) -> bytes:
        """PKCS#1 DER encoding of the private key (unencrypted)."""
        return self._private_key.private_bytes(
            encoding=serialization.Encoding.DER,
            format=serialization.PrivateFormat.TraditionalOpenSSL,
            encryption_algorithm=serialization.NoEncryption(),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RSAPrivateKey:
        """Load a key produced by :meth:`to_bytes` (PKCS#1 DER; PKCS#8 DER is accepted too)."""
        try:
            key = serialization.load_der_private_key(bytes(data), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ValueError(f"Not a DER-encoded RSA private key ({len(data)} bytes): {e}") from e
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"Expected an RSA private key, got {type(key).__name__}")
        return cls(key)

    def __getstate__(self):
        return {"_private_key": self.to_bytes()}  # the layout of hivemind 1.1.12's pickles: each reads the other's

    def __setstate__(self, state):
        data = state.get("_private_key", state.get("private_key")) if isinstance(state, dict) else None
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"Cannot unpickle an RSAPrivateKey from {type(state).__name__}: expected DER key bytes")
        self._private_key = serialization.load_der_private_key(bytes(data), password=None)
        self._public_key = None

    def __repr__(self):
        return f"{self.__class__.__name__}(public_key={self.get_public_key().to_bytes()[:32].decode()}...)"


class RSAPublicKey:
    """An RSA public key; serialized in OpenSSH format (``ssh-rsa AAAA...``)."""

    def __init__(self, public_key: rsa.RSAPublicKey):
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise TypeError(f"expected a cryptography RSAPublicKey, got {type(public_key).__name__}")
        self._public_key = public_key
        self._bytes: Optional[bytes] = None  # serialized once: signed records embed it in every key they protect

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True iff ``signature`` (base64) is a valid RSA-PSS signature of ``data``; never raises on garbage."""
        if not isinstance(signature, (bytes, bytearray, memoryview)) or len(signature) > _MAX_SIGNATURE_LENGTH:
            return False
        try:
            raw_signature = base64.b64decode(bytes(signature), validate=True)
            self._public_key.verify(raw_signature, bytes(data), _PSS_PADDING, hashes.SHA256())
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            return False
        return True

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            self._bytes = self._public_key.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        return self._bytes

    @classmethod
    def from_bytes(cls, key: bytes) -> RSAPublicKey:
        """Load an OpenSSH-format RSA public key; raises ValueError for anything else."""
        try:
            public_key = serialization.load_ssh_public_key(bytes(key))
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ValueError(f"Not an OpenSSH RSA public key: {bytes(key)[:64]!r}: {e}") from e
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise ValueError(f"Expected an RSA public key, got {type(public_key).__name__}")
        return cls(public_key)

    def __getstate__(self):
        return {"public_key": self.to_bytes()}

    def __setstate__(self, state):
        self._public_key = serialization.load_ssh_public_key(state["public_key"])
        self._bytes = None

    def __eq__(self, other):
        return isinstance(other, RSAPublicKey) and self.to_bytes() == other.to_bytes()

    def __hash__(self):
        return hash(self.to_bytes())

    def __repr__(self):
        return f"{self.__class__.__name__}({self.to_bytes()[:40].decode()}...)"


def _reset_process_wide_key_after_fork() -> None:
    # a forked child may inherit a lock held by another thread; the key itself is kept (same identity)
    RSAPrivateKey._process_wide_key_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_process_wide_key_after_fork)
