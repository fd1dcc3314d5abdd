"""Objects pickled (or torch.save'd) by one implementation unpickle in the other and keep working.

Downstream users keep such files across an upgrade (and a downgrade): peer ids in saved run metadata, DHT
dictionary values, descriptors and compression settings. The original runs in its own interpreter.
"""

import pickle
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import PeerID, PeerInfo
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import TimedStorage, ValueWithExpiration

from .harness import ORIGINAL_PYTHON, process_env

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

PEER = "QmQVwjVyQoMf3H3uYSsRk2ugWJxavaRcXVoQ4GCLSqP8hg"
FAR = 1e10  # an expiration time far in the future


def run_original(script: str, directory: Path) -> str:
    proc = subprocess.run(
        [str(ORIGINAL_PYTHON), "-s", "-c", textwrap.dedent(script), str(directory)],
        cwd=directory,  # not the repository: only the original's hivemind can be imported there
        env=process_env("original"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


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
