"""libp2p identity files: a serialized ``crypto.pb.PrivateKey`` (new ones hold a PKCS#1 DER RSA key)."""

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import crypto_pb2

RSA_KEY_SIZE = 2048
RSA_PUBLIC_EXPONENT = 65537
IDENTITY_FILE_MODE = 0o400


def generate_identity_bytes() -> bytes:
    """A new 2048-bit RSA key as the contents of a libp2p identity file."""
    private_key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_SIZE)
    der = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()


def generate_identity(identity_path: str) -> None:
    """Create a new identity file (mode 0400); refuses to overwrite an existing file."""
    data = generate_identity_bytes()
    try:
        fd = os.open(identity_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, IDENTITY_FILE_MODE)
    except FileExistsError:
        raise FileExistsError(
            f"Identity file {identity_path} already exists; delete it to generate a new one"
        ) from None
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(identity_path))
        raise FileNotFoundError(
            f"identity_path {identity_path} cannot be created: its directory {directory} does not exist; create it "
            f"(mkdir -p {directory}) or pass an identity_path in an existing directory"
        ) from None
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def identity_file_exists(identity_path: str) -> bool:
    """Whether the identity file exists (``IsADirectoryError`` for a directory: p2pd would fail to read it)."""
    if os.path.isdir(identity_path):
        raise IsADirectoryError(
            f"identity_path {identity_path} is a directory; pass the path of a key file (it is created if missing), "
            f"e.g. {os.path.join(identity_path, 'identity.key')}"
        )
    return os.path.exists(identity_path)


class InvalidIdentityError(P2PDaemonError, ValueError):
    """``identity_path`` holds no libp2p private key; raised before p2pd starts."""


def load_identity_peer_id(identity_path: str) -> PeerID:
    """Peer id of an existing identity file (RSA, Ed25519, Secp256k1 or ECDSA, as p2pd takes them);
    ``InvalidIdentityError`` names the file and what to do if it holds none."""
    with open(identity_path, "rb") as file:
        data = file.read()
    try:
        return PeerID.from_identity(data)
    except Exception as e:
        raise InvalidIdentityError(
            f"invalid identity file {identity_path}: it is not a libp2p private key ({e}); pass a file written by "
            f"P2P.generate_identity (or by an earlier run with identity_path), or a path that does not exist to "
            f"have a new identity created there"
        ) from e
