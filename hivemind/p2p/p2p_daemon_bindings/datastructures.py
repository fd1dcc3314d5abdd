"""Peer identifiers and small records exchanged with p2pd."""

import dataclasses
import hashlib
from typing import Any, Iterable, List, Optional, Union

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hivemind.proto import crypto_pb2, p2pd_pb2
from hivemind.utils.multiaddr import Multiaddr

SHA2_256_CODE = 0x12
IDENTITY_CODE = 0x00
MAX_INLINE_KEY_LENGTH = 42  # libp2p inlines serialized public keys of at most this many bytes (identity multihash)


class PeerID:
    """A libp2p peer id: the multihash of the peer's serialized public key. ``str()`` gives base58."""

    __slots__ = ("_bytes", "_b58", "_hash")

    def __init__(self, peer_id_bytes: bytes) -> None:
        if not isinstance(peer_id_bytes, (bytes, bytearray, memoryview)):
            raise TypeError(f"PeerID expects bytes, got {type(peer_id_bytes).__name__} (use PeerID.from_base58)")
        self._bytes = bytes(peer_id_bytes)
        self._b58: Optional[str] = None  # computed on first use: incoming requests rarely need it
        self._hash = hash(self._bytes)

    def to_bytes(self) -> bytes:
        return self._bytes

    def to_base58(self) -> str:
        if self._b58 is None:
            self._b58 = base58.b58encode(self._bytes).decode()
        return self._b58

    def pretty(self) -> str:
        return self.to_base58()

    def to_string(self) -> str:
        return self.to_base58()

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"<PeerID {self.to_base58()}>"

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, PeerID):
            return self._bytes == other._bytes
        if isinstance(other, str):
            return self.to_base58() == other
        if isinstance(other, (bytes, bytearray)):
            return self._bytes == other
        return NotImplemented

    def __lt__(self, other: "PeerID") -> bool:
        if not isinstance(other, PeerID):
            return NotImplemented
        return self.to_base58() < other.to_base58()

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        return PeerID, (self._bytes,)

    def __setstate__(self, state: Any) -> None:
        # only pickles written by hivemind 1.1.12 get here (ours reduce to PeerID(bytes)): its state is a dict
        # {"_bytes": ..., "_b58_str": ...}
        peer_id_bytes = state.get("_bytes") if isinstance(state, dict) else None
        if not isinstance(peer_id_bytes, (bytes, bytearray)):
            raise TypeError(f"Cannot unpickle a PeerID from state {state!r}: expected a dict with '_bytes'")
        PeerID.__init__(self, peer_id_bytes)

    @classmethod
    def from_base58(cls, base58_id: str) -> "PeerID":
        try:
            return cls(base58.b58decode(base58_id))
        except ValueError as e:
            raise ValueError(f"Invalid base58 peer id {base58_id!r}: {e}") from e

    @classmethod
    def from_public_key(cls, public_key: Union[bytes, crypto_pb2.PublicKey]) -> "PeerID":
        """Peer id of a public key given as a ``crypto.pb.PublicKey`` message or its serialized bytes."""
        serialized = public_key.SerializeToString() if isinstance(public_key, crypto_pb2.PublicKey) else public_key
        if len(serialized) <= MAX_INLINE_KEY_LENGTH:
            return cls(bytes([IDENTITY_CODE, len(serialized)]) + serialized)
        return cls(bytes([SHA2_256_CODE, 32]) + hashlib.sha256(serialized).digest())

    @classmethod
    def from_identity(cls, data: bytes) -> "PeerID":
        """Peer id of an identity file's contents (a serialized ``crypto.pb.PrivateKey`` of any key type p2pd takes:
        RSA, Ed25519, Secp256k1 or ECDSA)."""
        private_key_msg = crypto_pb2.PrivateKey()
        try:
            private_key_msg.ParseFromString(data)
        except Exception as e:
            raise ValueError(f"Identity data is not a serialized crypto.pb.PrivateKey: {e}") from e
        key_type, key_data = private_key_msg.key_type, private_key_msg.data
        if key_type == crypto_pb2.Ed25519:
            # libp2p stores Ed25519 private keys as seed || public key (64 bytes); old ones repeat the public key
            if len(key_data) not in (64, 96) or len(key_data) == 96 and key_data[32:64] != key_data[64:]:
                raise ValueError(f"An Ed25519 identity holds seed || public key (64 bytes), got {len(key_data)} bytes")
            public_data = key_data[32:64]
        elif key_type == crypto_pb2.Secp256k1:  # the raw 32-byte scalar; the public key is a compressed point
            if len(key_data) != 32:
                raise ValueError(f"A Secp256k1 identity holds 32 bytes, got {len(key_data)}")
            private_key = ec.derive_private_key(int.from_bytes(key_data, "big"), ec.SECP256K1())
            public_data = private_key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
        elif key_type in (crypto_pb2.RSA, crypto_pb2.ECDSA):  # PKCS#1 / SEC 1 DER; the public key as PKIX DER
            private_key = serialization.load_der_private_key(key_data, None)  # (unencrypted)
            expected = rsa.RSAPrivateKey if key_type == crypto_pb2.RSA else ec.EllipticCurvePrivateKey
            if not isinstance(private_key, expected):
                raise ValueError(f"The {crypto_pb2.KeyType.Name(key_type)} identity holds another kind of key")
            public_data = private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            raise ValueError(f"Unknown identity key type {key_type}")
        return cls.from_public_key(crypto_pb2.PublicKey(key_type=key_type, data=public_data))


class PeerInfo:
    """A peer id with the multiaddrs it is known at."""

    __slots__ = ("peer_id", "addrs")

    def __init__(self, peer_id: PeerID, addrs: Iterable[Multiaddr]) -> None:
        self.peer_id = peer_id
        self.addrs: List[Multiaddr] = list(addrs)

    @classmethod
    def from_protobuf(cls, peer_info_pb: p2pd_pb2.PeerInfo) -> "PeerInfo":
        return cls(PeerID(peer_info_pb.id), [Multiaddr(addr) for addr in peer_info_pb.addrs])

    def __str__(self) -> str:
        return f"{self.peer_id.to_base58()} {','.join(str(addr) for addr in self.addrs)}"

    def __repr__(self) -> str:
        return f"PeerInfo(peer_id={self.peer_id!r}, addrs={self.addrs!r})"

    def __setstate__(self, state: Any) -> None:
        # ours pickle as (None, {slot: value}); hivemind 1.1.12's as a plain {"peer_id": ..., "addrs": ...}
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not {"peer_id", "addrs"} <= state.keys():
            raise TypeError(f"Cannot unpickle a PeerInfo from state {state!r}: expected 'peer_id' and 'addrs'")
        self.peer_id, self.addrs = state["peer_id"], list(state["addrs"])


@dataclasses.dataclass
class StreamInfo:
    """Description of a libp2p stream: remote peer, remote multiaddr and protocol (handle name)."""

    peer_id: PeerID
    addr: Multiaddr
    proto: str

    def to_protobuf(self) -> p2pd_pb2.StreamInfo:
        return p2pd_pb2.StreamInfo(peer=self.peer_id.to_bytes(), addr=self.addr.to_bytes(), proto=self.proto)

    @classmethod
    def from_protobuf(cls, message: p2pd_pb2.StreamInfo) -> "StreamInfo":
        return cls(PeerID(message.peer), Multiaddr(message.addr), message.proto)
