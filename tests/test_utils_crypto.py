import base64
import multiprocessing as mp
import pickle

import pytest

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey


@pytest.fixture(scope="module")
def private_key():
    return RSAPrivateKey()


def test_sign_and_verify(private_key):
    signature = private_key.sign(b"hello")
    base64.b64decode(signature, validate=True)  # base64 with standard alphabet
    assert len(base64.b64decode(signature)) == 256  # 2048-bit key
    assert private_key.get_public_key().verify(b"hello", signature)


def test_signatures_are_randomized_pss(private_key):
    assert private_key.sign(b"x") != private_key.sign(b"x")


def test_tampered_data_or_signature_fails(private_key):
    public_key = private_key.get_public_key()
    signature = private_key.sign(b"hello")
    assert not public_key.verify(b"hellO", signature)
    raw = bytearray(base64.b64decode(signature))
    raw[10] ^= 1
    assert not public_key.verify(b"hello", base64.b64encode(bytes(raw)))


def test_other_key_does_not_verify(private_key):
    assert not RSAPrivateKey().get_public_key().verify(b"hello", private_key.sign(b"hello"))


@pytest.mark.parametrize("garbage", [b"", b"not base64!!", b"AAAA", b"=" * 10, b"A" * 100000, "str", None])
def test_verify_never_raises_on_garbage(private_key, garbage):
    assert private_key.get_public_key().verify(b"hello", garbage) is False


def test_key_parameters(private_key):
    numbers = private_key._private_key.private_numbers().public_numbers
    assert numbers.e == 65537 and numbers.n.bit_length() == 2048


def test_private_key_round_trips_as_pkcs1_der(private_key):
    data = private_key.to_bytes()
    assert data[:2] == b"\x30\x82"  # DER SEQUENCE
    restored = RSAPrivateKey.from_bytes(data)
    assert restored.get_public_key() == private_key.get_public_key()
    assert private_key.get_public_key().verify(b"m", restored.sign(b"m"))


def test_public_key_is_openssh(private_key):
    data = private_key.get_public_key().to_bytes()
    assert data.startswith(b"ssh-rsa AAAA")
    assert RSAPublicKey.from_bytes(data) == private_key.get_public_key()


@pytest.mark.parametrize("garbage", [b"", b"ssh-rsa", b"ssh-rsa AAAA", b"\x00" * 50])
def test_public_key_from_garbage_raises_value_error(garbage):
    with pytest.raises(ValueError):
        RSAPublicKey.from_bytes(garbage)


def test_private_key_from_garbage_raises_value_error():
    with pytest.raises(ValueError):
        RSAPrivateKey.from_bytes(b"\x30\x82garbage")


def test_keys_are_picklable(private_key):
    restored = pickle.loads(pickle.dumps(private_key))
    assert restored.to_bytes() == private_key.to_bytes()
    public = pickle.loads(pickle.dumps(private_key.get_public_key()))
    assert public.verify(b"z", private_key.sign(b"z"))


def _child_public_key(queue):
    queue.put(RSAPrivateKey.process_wide().get_public_key().to_bytes())


def test_process_wide_key_is_a_singleton_kept_in_forked_children():
    key = RSAPrivateKey.process_wide()
    assert RSAPrivateKey.process_wide() is key
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_child_public_key, args=(queue,))
    process.start()
    assert queue.get(timeout=30) == key.get_public_key().to_bytes()
    process.join(timeout=30)
