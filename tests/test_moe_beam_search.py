"""Beam search over declared experts: plain logic with a fake fetch, then declarations in a real DHT."""

import asyncio
import time

import pytest

from hivemind.dht import DHT
from hivemind.moe.client.beam_search import MoEBeamSearcher, beam_search, parse_successors, top_distinct_experts
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.dht_handler import DHTHandlerThread, declaration_entries, declare_experts, get_experts
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time

PEER = "QmTkFQf2PN5tMxy6pbwcKKWWKt8CMjfNaY4fxKU3V7StGN"
PEER_ID = PeerID.from_base58(PEER)


def stored(entries: dict) -> ValueWithExpiration:
    """What DHTNode.get returns for a dictionary value."""
    return ValueWithExpiration({k: ValueWithExpiration(v, 1e12) for k, v in entries.items()}, 1e12)


# ------------------------------------------------------------------ plain logic


def test_declaration_entries_are_the_uid_and_each_prefix():
    keys, values, subkeys = declaration_entries(["ffn.1.2.3", "ffn.5"], PEER)
    assert list(zip(keys, subkeys, values)) == [
        ("ffn.1.2.3", None, PEER),
        ("ffn.1.2.", 3, ("ffn.1.2.3", PEER)),
        ("ffn.1.", 2, ("ffn.1.2.3", PEER)),
        ("ffn.5", None, PEER),
        ("ffn.5.", -1, ("ffn.5", PEER)),
    ]


def test_parse_successors_keeps_only_well_formed_entries():
    found = stored(
        {
            0: ("ffn.1.0", PEER),
            1: ("ffn.1.1.7", PEER),  # a deeper expert under coordinate 1: fine
            2: ("ffn.9.2", PEER),  # not under this prefix
            3: ("ffn.1.3", "not a peer id"),
            4: ("ffn.1.4",),  # not a pair
            5: None,
            6: ("ffn.1.6", PEER),  # outside a grid dimension of size 6
            -1: None,  # negative cache entry
            "7": ("ffn.1.7", PEER),
        }
    )
    assert parse_successors("ffn.1.", found, grid_size=6) == {
        0: ExpertInfo("ffn.1.0", PEER_ID),
        1: ExpertInfo("ffn.1.1.7", PEER_ID),
    }
    assert parse_successors("ffn.1.", stored({True: ("ffn.1.1", PEER)})) == {}  # a bool is no coordinate
    assert parse_successors("ffn.1.", None) == {} and parse_successors("ffn.1.", ValueWithExpiration(PEER, 1)) == {}


def test_parse_successors_accepts_a_flat_expert_only_for_its_own_prefix():
    assert parse_successors("ffn.5.", stored({-1: ("ffn.5", PEER)})) == {-1: ExpertInfo("ffn.5", PEER_ID)}
    assert parse_successors("ffn.5.", stored({-1: ("ffn.6", PEER)})) == {}


def make_fetch(alive_uids, calls=None):
    """A fetch callback answering from a set of alive uids, recording each batch of prefixes."""

    async def fetch(prefixes):
        if calls is not None:
            calls.append(list(prefixes))
        result = {}
        for prefix in prefixes:
            entries = {}
            for uid in alive_uids:
                if uid + "." == prefix:
                    entries[-1] = (uid, PEER)
                elif uid.startswith(prefix):
                    entries[int(uid[len(prefix) :].split(".")[0])] = (uid, PEER)
            result[prefix] = parse_successors(prefix, stored(entries) if entries else None)
        return result

    return fetch


def search(alive, scores, k, **kwargs):
    return [info.uid for info in asyncio.run(beam_search("ffn.", scores, k, make_fetch(alive), **kwargs))]


def test_beam_search_returns_the_k_best_alive_experts_best_first():
    alive = [f"ffn.{i}.{j}" for i in range(3) for j in range(3)]
    scores = [[0.0, 10.0, 5.0], [1.0, 3.0, 2.0]]
    assert search(alive, scores, 4) == ["ffn.1.1", "ffn.1.2", "ffn.1.0", "ffn.2.1"]


def test_beam_search_returns_fewer_experts_when_fewer_are_alive():
    assert search(["ffn.0.2", "ffn.2.0"], [[0.0, 10.0, 5.0], [1.0, 3.0, 2.0]], 4) == ["ffn.2.0", "ffn.0.2"]
    assert search([], [[0.0, 1.0], [0.0]], 2) == []


def test_beam_search_over_a_flat_grid():
    assert search(["ffn.0", "ffn.3", "ffn.4"], [[5.0, 0.0, 0.0, 1.0, 2.0]], 2) == ["ffn.0", "ffn.4"]


def test_beam_search_skips_dropped_indices():
    alive = [f"ffn.{i}.{j}" for i in range(2) for j in range(2)]
    inf = float("inf")
    assert search(alive, [[-inf, 0.0], [5.0, -inf]], 3) == ["ffn.1.0"]


def test_beam_search_experts_are_distinct():
    a, b = ExpertInfo("ffn.1.1", PEER_ID), ExpertInfo("ffn.0.0", PEER_ID)
    assert top_distinct_experts([(5.0, a), (4.0, a), (3.0, b)], 2) == [a, b]


def test_beam_search_returns_only_uids_with_exactly_the_grid_coordinates():
    # a deeper uid announced under ffn.1. (coordinate 1) is not an expert of a 2-D grid
    assert search(["ffn.1.1.0", "ffn.0.0"], [[0.0, 1.0], [0.0, 1.0]], 3) == ["ffn.0.0"]


def test_beam_search_fetches_first_dimension_prefixes_in_batches_until_the_beam_is_full():
    calls = []
    scores = [[float(i) for i in range(10)], [0.0]]
    infos = asyncio.run(beam_search("ffn.", scores, 2, make_fetch(["ffn.9.0", "ffn.8.0"], calls), batch_size=2))
    assert [info.uid for info in infos] == ["ffn.9.0", "ffn.8.0"]
    assert calls == [["ffn.9.", "ffn.8."]]


# ------------------------------------------------------------------ real DHT


@pytest.fixture
def two_dhts():
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield first, second
    finally:
        second.shutdown()
        first.shutdown()


def test_declare_experts_refuses_a_string_or_an_invalid_uid(two_dhts):
    server_dht, _ = two_dhts
    with pytest.raises(AssertionError):
        declare_experts(server_dht, "ffn.1", get_dht_time() + 10)
    with pytest.raises(AssertionError):
        declare_experts(server_dht, ["ffn.01"], get_dht_time() + 10)


def test_find_best_experts_through_the_dht(two_dhts):
    server_dht, client_dht = two_dhts
    declare_experts(server_dht, ["ffn.0.0", "ffn.0.2", "ffn.1.1", "ffn.2.0"], get_dht_time() + 30)
    searcher = MoEBeamSearcher(client_dht, "ffn", (3, 3))
    best = searcher.find_best_experts([[0.0, 10.0, 5.0], [1.0, 3.0, 2.0]], 3)
    assert [expert.uid for expert in best] == ["ffn.1.1", "ffn.2.0", "ffn.0.2"]
    assert all(expert.peer_id == server_dht.peer_id for expert in best)
    batch = searcher.batch_find_best_experts([[[0, 10, 5], [10, 0, 0]], [[1, 3, 2], [1, 3, 2]]], 2)
    assert [[expert.uid for expert in row] for row in batch] == [["ffn.1.1", "ffn.2.0"], ["ffn.0.2", "ffn.0.0"]]
    beam = searcher.get_initial_beam([0.0, 10.0, 5.0], 2)
    assert [(score, prefix, sorted(successors)) for score, prefix, successors in beam] == [
        (10.0, "ffn.1.", [1]),
        (5.0, "ffn.2.", [0]),
    ]
    assert sorted(searcher.get_active_successors(["ffn.0.", "ffn.1."], grid_size=3)["ffn.0."]) == [0, 2]


@pytest.mark.parametrize("negative_caching", [True, False])
def test_missing_prefixes_are_negatively_cached_under_subkey_minus_one(two_dhts, negative_caching):
    server_dht, client_dht = two_dhts
    declare_experts(server_dht, ["ffn.0.0"], get_dht_time() + 30)
    searcher = MoEBeamSearcher(client_dht, "ffn.", (3, 1), negative_caching=negative_caching, cache_expiration=100)
    assert [expert.uid for expert in searcher.find_best_experts([[0.0, 1.0, 2.0], [0.0]], 3)] == ["ffn.0.0"]
    for prefix in ["ffn.1.", "ffn.2."]:
        cached = server_dht.get(prefix, latest=True)
        if negative_caching:
            assert cached.value[-1].value is None
            assert abs(cached.value[-1].expiration_time - (get_dht_time() + 100)) < 10
        else:
            assert cached is None
    assert server_dht.get("ffn.0.", latest=True).value.keys() == {0}  # found prefixes are left alone
    declare_experts(server_dht, ["ffn.2.0"], get_dht_time() + 30)  # readers skip the None entry
    assert [expert.uid for expert in searcher.find_best_experts([[0.0, 1.0, 2.0], [0.0]], 3)][0] == "ffn.2.0"


def wait_until(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.mark.timeout(30)
def test_declarations_expire(two_dhts):
    server_dht, client_dht = two_dhts
    expiration = get_dht_time() + 2
    declare_experts(server_dht, ["ffn.4.2"], expiration)
    assert get_experts(client_dht, ["ffn.4.2"])[0].uid == "ffn.4.2"
    wait_until(lambda: get_dht_time() > expiration, timeout=5)
    assert get_experts(client_dht, ["ffn.4.2"]) == [None]
    assert MoEBeamSearcher(client_dht, "ffn.", (5, 3)).find_best_experts([[0.0] * 5, [0.0] * 3], 2) == []


@pytest.mark.timeout(30)
def test_handler_thread_declares_until_shut_down(two_dhts):
    server_dht, client_dht = two_dhts
    thread = DHTHandlerThread({"ffn.0": None, "ffn.1": None}, server_dht, update_period=0.5, expiration=2)
    thread.start()
    try:
        wait_until(lambda: None not in get_experts(client_dht, ["ffn.0", "ffn.1"]), timeout=10)
        time.sleep(2.5)  # longer than one expiration: still there because it is refreshed
        assert None not in get_experts(client_dht, ["ffn.0", "ffn.1"])
    finally:
        thread.shutdown()
    assert not thread.is_alive()
    wait_until(lambda: get_experts(client_dht, ["ffn.0", "ffn.1"]) == [None, None], timeout=10)


def test_searches_and_lookups_can_return_futures(two_dhts):
    server_dht, client_dht = two_dhts
    declare_experts(server_dht, ["ffn.0.1", "ffn.1.0"], get_dht_time() + 30)
    searcher = MoEBeamSearcher(client_dht, "ffn.", (2, 2))
    found = searcher.find_best_experts([[0.0, 1.0], [1.0, 0.0]], 1, return_future=True)
    batch = searcher.batch_find_best_experts([[[0.0, 1.0]], [[1.0, 0.0]]], 2, return_future=True)
    experts = get_experts(client_dht, ["ffn.0.1", "ffn.0.0"], return_future=True)
    assert [expert.uid for expert in found.result(timeout=10)] == ["ffn.1.0"]
    assert [[expert.uid for expert in row] for row in batch.result(timeout=10)] == [["ffn.1.0", "ffn.0.1"]]
    assert [expert and expert.uid for expert in experts.result(timeout=10)] == ["ffn.0.1", None]
