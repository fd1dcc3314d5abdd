"""identity_path with initial_peers: the start first checks that no online peer uses the identity, which needs its
peer id, computed here from the file. Every key p2pd takes (RSA, Ed25519 also in its older 96-byte form, Secp256k1,
ECDSA) must work there as it does without initial peers, and a file that is no libp2p key must fail as it does
without them (P2PDaemonError), saying what to do."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hivemind.p2p import P2PDaemonError
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2

pytestmark = pytest.mark.timeout(60)


def secp256k1_identity() -> bytes:
    private_key = ec.generate_private_key(ec.SECP256K1())
    scalar = private_key.private_numbers().private_value.to_bytes(32, "big")  # libp2p keeps the raw scalar
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.Secp256k1, data=scalar).SerializeToString()


def ecdsa_identity() -> bytes:
    private_key = ec.generate_private_key(ec.SECP256R1())
    der = private_key.private_bytes(  # libp2p keeps the SEC 1 DER form
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.ECDSA, data=der).SerializeToString()


def ed25519_identity_with_public_key_twice() -> bytes:
    private_key = ed25519.Ed25519PrivateKey.generate()
    seed = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=seed + public + public).SerializeToString()


@pytest.mark.parametrize("make_identity", [secp256k1_identity, ecdsa_identity, ed25519_identity_with_public_key_twice])
async def test_identities_of_every_key_type_p2pd_takes_pass_the_identity_check(make_identity, tmp_path, p2p_factory):
    path = tmp_path / "identity.key"
    path.write_bytes(make_identity())
    alone = await p2p_factory(identity_path=str(path))  # p2pd computes the peer id itself
    assert PeerID.from_identity(path.read_bytes()) == alone.peer_id
    await alone.shutdown()

    bootstrap = await p2p_factory()
    # before: ValueError('Only RSA and Ed25519 identities are supported ...') from the identity check
    peer = await p2p_factory(identity_path=str(path), initial_peers=await bootstrap.get_visible_maddrs())
    assert peer.peer_id == alone.peer_id


async def test_a_file_that_is_no_key_fails_alike_with_initial_peers(tmp_path, p2p_factory):
    path = tmp_path / "identity.pem"
    path.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n")
    bootstrap = await p2p_factory()
    for initial_peers in (None, await bootstrap.get_visible_maddrs()):
        with pytest.raises(P2PDaemonError, match=f"identity file {path}") as info:
            await p2p_factory(identity_path=str(path), initial_peers=initial_peers)
        assert "generate_identity" in str(info.value), "the error says how to get a valid identity file"
