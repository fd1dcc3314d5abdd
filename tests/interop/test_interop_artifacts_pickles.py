"""Objects pickled (or torch.save'd) by one implementation unpickle in the other and keep working.

Downstream users keep such files across an upgrade (and a downgrade): peer ids in saved run metadata, DHT
dictionary values, descriptors and compression settings. The original runs in its own interpreter.
"""

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.optim.progress_tracker import GlobalTrainingProgress
from hivemind.p2p import PeerID, PeerInfo
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import TimedStorage, ValueWithExpiration

from .harness import run_original_script

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

PEER = "QmQVwjVyQoMf3H3uYSsRk2ugWJxavaRcXVoQ4GCLSqP8hg"
FAR = 1e10  # an expiration time far in the future


def run_original(script: str, directory: Path) -> str:
    return run_original_script(script, directory)


def test_peer_ids_pickled_by_the_original_unpickle_as_equal_peer_ids(original_env, tmp_path):
    run_original(
        f"""
        import pickle, sys, torch, multiaddr
        from hivemind.p2p import PeerID, PeerInfo
        from hivemind.moe.expert_uid import ExpertInfo
        peer_id = PeerID.from_base58({PEER!r})
        info = PeerInfo(peer_id, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1234")])
        expert = ExpertInfo("ffn.1", peer_id)
        objects = {{"peer_id": peer_id, "info": info, "expert": expert, "by_peer": {{peer_id: 1}}}}
        pickle.dump(objects, open(sys.argv[1] + "/objects.pkl", "wb"))
        torch.save(objects, sys.argv[1] + "/objects.pt")
        """,
        tmp_path,
    )
    expected = PeerID.from_base58(PEER)
    for loaded in (
        pickle.loads((tmp_path / "objects.pkl").read_bytes()),
        torch.load(tmp_path / "objects.pt", weights_only=False),
    ):
        peer_id, info, expert = loaded["peer_id"], loaded["info"], loaded["expert"]
        assert isinstance(peer_id, PeerID) and peer_id == expected and hash(peer_id) == hash(expected)
        assert peer_id.to_base58() == PEER and peer_id.to_bytes() == expected.to_bytes()
        assert loaded["by_peer"][expected] == 1
        assert isinstance(info, PeerInfo) and info.peer_id == expected
        assert [str(addr) for addr in info.addrs] == ["/ip4/127.0.0.1/tcp/1234"]
        assert isinstance(info.addrs[0], Multiaddr)
        assert expert.uid == "ffn.1" and expert.peer_id == expected
        assert pickle.loads(pickle.dumps(info)).peer_id == expected  # and pickle again as ours


def test_peer_ids_pickled_by_ours_unpickle_in_the_original(original_env, tmp_path):
    peer_id = PeerID.from_base58(PEER)
    info = PeerInfo(peer_id, [Multiaddr("/ip4/127.0.0.1/tcp/1234")])
    (tmp_path / "objects.pkl").write_bytes(pickle.dumps({"peer_id": peer_id, "info": info}))
    out = run_original(
        f"""
        import pickle, sys
        from hivemind.p2p import PeerID
        loaded = pickle.load(open(sys.argv[1] + "/objects.pkl", "rb"))
        assert loaded["peer_id"] == PeerID.from_base58({PEER!r}) == loaded["info"].peer_id
        print(loaded["peer_id"].to_base58(), [str(addr) for addr in loaded["info"].addrs])
        """,
        tmp_path,
    )
    assert out.strip() == f"{PEER} ['/ip4/127.0.0.1/tcp/1234']"


def test_dictionary_values_pickled_by_the_original_unpickle_and_keep_working(original_env, tmp_path):
    run_original(
        f"""
        import pickle, sys
        from hivemind.dht.storage import DictionaryDHTValue
        from hivemind.utils.timed_storage import TimedStorage
        value = DictionaryDHTValue()
        value.store("b", b"second", {FAR} + 2)
        value.store("a", b"first", {FAR} + 1)
        storage = TimedStorage(maxsize=2)
        storage.store("x", 1, {FAR})
        pickle.dump((value, storage), open(sys.argv[1] + "/storages.pkl", "wb"))
        """,
        tmp_path,
    )
    value, storage = pickle.loads((tmp_path / "storages.pkl").read_bytes())
    assert isinstance(value, DictionaryDHTValue) and isinstance(storage, TimedStorage)
    assert value.get("a") == ValueWithExpiration(b"first", FAR + 1) and len(value) == 2
    assert value.top() == ("a", ValueWithExpiration(b"first", FAR + 1))
    assert value.latest_expiration_time == FAR + 2
    assert value.nbytes == value.entry_nbytes("a", b"first") + value.entry_nbytes("b", b"second")
    assert value.store("c", b"third", FAR + 3) and dict(value.items()).keys() == {"a", "b", "c"}
    decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps(value))
    assert dict(decoded.items()) == dict(value.items())
    with value.freeze():
        assert len(value) == 3
    assert storage.maxsize == 2 and storage.get("x") == (1, FAR)
    assert storage.store("y", 2, FAR + 1) and storage.store("z", 3, FAR + 2)
    assert sorted(key for key, _ in storage.items()) == ["y", "z"]  # the earliest-expiring entry was evicted


def test_dictionary_values_pickled_by_ours_unpickle_and_keep_working_in_the_original(original_env, tmp_path):
    value = DictionaryDHTValue()
    value.store("b", b"second", FAR + 2)
    value.store("a", b"first", FAR + 1)
    value.store("b", b"second again", FAR + 4)  # leaves a stale entry in our heap
    storage = TimedStorage(maxsize=2)
    storage.store("x", 1, FAR)
    (tmp_path / "storages.pkl").write_bytes(pickle.dumps((value, storage)))
    out = run_original(
        f"""
        import pickle, sys
        from hivemind.utils.serializer import MSGPackSerializer
        value, storage = pickle.load(open(sys.argv[1] + "/storages.pkl", "rb"))
        assert value.top()[0] == "a" and value.get("b").value == b"second again"
        assert value.store("c", b"third", {FAR} + 3)
        decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps(value))
        assert storage.store("y", 2, {FAR} + 1) and storage.store("z", 3, {FAR} + 2)
        print(sorted(k for k, _ in decoded.items()), sorted(k for k, _ in storage.items()))
        """,
        tmp_path,
    )
    assert out.strip() == "['a', 'b', 'c'] ['y', 'z']"


MADDRS = [
    f"/ip4/127.0.0.1/tcp/1234/p2p/{PEER}",
    "/ip4/10.0.0.7/udp/4001/quic/p2p/12D3KooWEQc8JnEqjER34gzCXuzn18K7nrRFEpBJNPEMBZzvZhUE",
    f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}/p2p-circuit/p2p/12D3KooWEQc8JnEqjER34gzCXuzn18K7nrRFEpBJNPEMBZzvZhUE",
    "/ip6/::1/tcp/31337",
]


def test_multiaddrs_of_the_original_unpickle_as_equal_multiaddrs(original_env, tmp_path):
    # the original's own Multiaddr class, as its get_visible_maddrs() and PeerInfo.addrs return them
    run_original(
        f"""
        import pickle, sys, torch
        from hivemind.p2p import PeerID, PeerInfo
        from hivemind.utils.multiaddr import Multiaddr
        maddrs = [Multiaddr(address) for address in {MADDRS!r}]
        info = PeerInfo(PeerID.from_base58({PEER!r}), maddrs)
        pickle.dump((maddrs, info), open(sys.argv[1] + "/maddrs.pkl", "wb"))
        torch.save(maddrs, sys.argv[1] + "/maddrs.pt")
        """,
        tmp_path,
    )
    maddrs, info = pickle.loads((tmp_path / "maddrs.pkl").read_bytes())
    expected = [Multiaddr(address) for address in MADDRS]
    for loaded in maddrs, info.addrs, torch.load(tmp_path / "maddrs.pt", weights_only=False):
        assert [str(maddr) for maddr in loaded] == MADDRS
        assert all(isinstance(maddr, Multiaddr) for maddr in loaded)
        assert loaded == expected and [hash(maddr) for maddr in loaded] == [hash(maddr) for maddr in expected]
        assert [maddr.to_bytes() for maddr in loaded] == [maddr.to_bytes() for maddr in expected]
    repickled = pickle.loads(pickle.dumps(maddrs))
    assert repickled == expected and all(type(maddr) is Multiaddr for maddr in repickled)


def test_signing_keys_and_validators_unpickle_both_ways_and_sign_alike(original_env, tmp_path):
    # a key pickled to keep the same signing identity across runs (records stay updatable by their owner)
    run_original(
        """
        import pickle, sys
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.utils.crypto import RSAPrivateKey
        key = RSAPrivateKey()
        pickle.dump((key, RSASignatureValidator(key)), open(sys.argv[1] + "/original.pkl", "wb"))
        open(sys.argv[1] + "/original_tag", "wb").write(RSASignatureValidator(key).local_public_key)
        """,
        tmp_path,
    )
    key, validator = pickle.loads((tmp_path / "original.pkl").read_bytes())
    assert isinstance(key, RSAPrivateKey) and isinstance(validator, RSASignatureValidator)
    original_tag = (tmp_path / "original_tag").read_bytes()
    assert validator.local_public_key == RSASignatureValidator(key).local_public_key == original_tag
    record = DHTRecord(key=b"key", subkey=original_tag, value=b"value", expiration_time=FAR)
    signed = dataclasses.replace(record, value=validator.sign_value(record))
    assert signed.value != record.value and RSASignatureValidator(RSAPrivateKey()).validate(signed)

    ours_key = RSAPrivateKey()
    (tmp_path / "ours.pkl").write_bytes(pickle.dumps((ours_key, RSASignatureValidator(ours_key))))
    out = run_original(
        """
        import pickle, sys
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.validation import DHTRecord
        key, validator = pickle.load(open(sys.argv[1] + "/ours.pkl", "rb"))
        tag = validator.local_public_key
        assert tag == RSASignatureValidator(key).local_public_key
        record = DHTRecord(key=b"key", subkey=tag, value=b"value", expiration_time=1e10)
        signed = DHTRecord(key=b"key", subkey=tag, value=validator.sign_value(record), expiration_time=1e10)
        print(tag.decode(), validator.validate(signed))
        """,
        tmp_path,
    )
    assert out.split() == [*RSASignatureValidator(ours_key).local_public_key.decode().split(), "True"]


def test_swarm_progress_pickled_by_ours_unpickles_in_the_original(original_env, tmp_path):
    progress = GlobalTrainingProgress(3, 5, 10, 2, 0, eta_next_epoch=1.0, next_fetch_time=2.0)
    (tmp_path / "progress.pkl").write_bytes(pickle.dumps(progress))
    out = run_original(
        """
        import pickle, sys
        progress = pickle.load(open(sys.argv[1] + "/progress.pkl", "rb"))
        print(type(progress).__name__, progress.epoch, progress.samples_accumulated, progress.target_batch_size)
        """,
        tmp_path,
    )
    assert out.split() == ["GlobalTrainingProgress", "3", "5", "10"]
    assert pickle.loads(pickle.dumps(progress)) == progress


SCHEMA_MODULE = """
from typing import Dict
from pydantic import v1 as pydantic_v1

class ArtifactSchema(pydantic_v1.BaseModel):
    experts: Dict[pydantic_v1.StrictStr, pydantic_v1.StrictInt]
    name: pydantic_v1.StrictStr
"""

CHECK_VALIDATOR = """
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

def verdicts(validator):
    name, experts = (DHTID.generate(source=field).to_bytes() for field in ("name", "experts"))
    regular, entry = MSGPackSerializer.dumps(None), MSGPackSerializer.dumps("ffn.0")
    records = [
        (name, regular, "abc"), (name, regular, 123), (experts, entry, 5), (experts, entry, "5"),
        (DHTID.generate(source="other").to_bytes(), regular, 1),
    ]
    return [validator.validate(DHTRecord(k, s, MSGPackSerializer.dumps(v), 1e10)) for k, s, v in records]
"""


def test_schema_validators_unpickle_both_ways_and_judge_alike(original_env, tmp_path, monkeypatch):
    (tmp_path / "artifact_schema.py").write_text(SCHEMA_MODULE)
    (tmp_path / "check_validator.py").write_text(CHECK_VALIDATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    from artifact_schema import ArtifactSchema
    from check_validator import verdicts

    from hivemind.dht.schema import SchemaValidator

    expected = [True, False, True, False, False]
    (tmp_path / "ours.pkl").write_bytes(pickle.dumps(SchemaValidator(ArtifactSchema, allow_extra_keys=False)))
    out = run_original(
        """
        import pickle, sys
        from artifact_schema import ArtifactSchema
        from check_validator import verdicts
        from hivemind.dht.schema import SchemaValidator
        pickle.dump(SchemaValidator(ArtifactSchema, allow_extra_keys=False), open("original.pkl", "wb"))
        print(verdicts(pickle.load(open("ours.pkl", "rb"))))
        """,
        tmp_path,
    )
    assert out.strip() == str(expected)
    loaded = pickle.loads((tmp_path / "original.pkl").read_bytes())
    assert isinstance(loaded, SchemaValidator) and verdicts(loaded) == expected
