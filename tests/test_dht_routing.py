"""DHTID hashing and distance, k-buckets and the routing table (pure logic)."""

import pickle
import random
import time

import pytest

from hivemind.dht.routing import DHTID, KBucket, RoutingTable
from hivemind.p2p import PeerID


def make_peer_id(name) -> PeerID:
    return PeerID(f"peer-{name}".encode())


def random_ids(count: int, rng: random.Random):
    return [DHTID(rng.getrandbits(160)) for _ in range(count)]


def test_dhtid_of_str_key_is_sha1_of_its_msgpack_encoding():
    assert DHTID.generate("foo").to_bytes().hex() == "bd4339d24800a1815bb1b7382320cab96bba0cde"


def test_dhtid_of_bytes_key_is_sha1_of_the_raw_bytes():
    assert DHTID.generate(b"raw").to_bytes().hex() == "ce15802a8c5e8e9db0ffaf10130ef265296e9ea4"


def test_bytes_key_equal_to_msgpack_of_str_key_gives_the_same_id():
    assert DHTID.generate(b"\xa3foo") == DHTID.generate("foo")


def test_random_dhtids_are_distinct_and_in_range():
    ids = [DHTID.generate() for _ in range(100)]
    assert len(set(ids)) == 100
    assert all(DHTID.MIN <= node_id < DHTID.MAX for node_id in ids)


def test_random_dhtids_do_not_depend_on_the_random_module_seed():
    random.seed(0)
    first = DHTID.generate()
    random.seed(0)
    assert DHTID.generate() != first


@pytest.mark.parametrize("value", [-1, 2**160, 2**161])
def test_dhtid_out_of_range_is_rejected(value):
    with pytest.raises(ValueError):
        DHTID(value)


def test_dhtid_from_non_int_is_rejected():
    with pytest.raises(TypeError):
        DHTID("123")


def test_to_bytes_is_20_bytes_big_endian_and_round_trips():
    node_id = DHTID(1)
    assert node_id.to_bytes() == b"\x00" * 19 + b"\x01"
    largest = DHTID(DHTID.MAX - 1)
    assert largest.to_bytes() == b"\xff" * 20
    for value in (node_id, largest, DHTID.generate()):
        restored = DHTID.from_bytes(value.to_bytes())
        assert restored == value and isinstance(restored, DHTID)


@pytest.mark.parametrize("raw", [b"", b"\x00" * 19, b"\x00" * 21])
def test_from_bytes_of_wrong_length_is_rejected(raw):
    with pytest.raises(ValueError):
        DHTID.from_bytes(raw)


def test_xor_distance_to_one_id_and_to_a_sequence():
    a, b, c = DHTID(0b1100), DHTID(0b1010), DHTID(0)
    assert a.xor_distance(b) == 0b0110
    assert a.xor_distance([b, c, a]) == [0b0110, 0b1100, 0]


def test_longest_common_prefix_length():
    top_bit = 1 << 159
    assert DHTID.longest_common_prefix_length(DHTID(0), DHTID(top_bit)) == 0
    assert DHTID.longest_common_prefix_length(DHTID(0), DHTID(1)) == 159
    assert DHTID.longest_common_prefix_length(DHTID(5), DHTID(5)) == 160
    assert DHTID.longest_common_prefix_length(DHTID(0), DHTID(1), DHTID(top_bit >> 3)) == 3


def test_dhtid_is_an_int_usable_as_dict_key():
    node_id = DHTID(42)
    assert node_id == 42 and {42: "x"}[node_id] == "x"
    assert repr(node_id) == "DHTID(0x2a)"


def test_kbucket_keeps_recency_order_and_overflows_into_replacements():
    bucket = KBucket(DHTID.MIN, DHTID.MAX, size=2)
    assert bucket.add_or_update_node(DHTID(1), "a")
    assert bucket.add_or_update_node(DHTID(2), "b")
    assert bucket.add_or_update_node(DHTID(1), "a")  # seen again: now most recent
    assert list(bucket.nodes) == [2, 1]
    assert not bucket.add_or_update_node(DHTID(3), "c")
    assert DHTID(3) not in bucket and bucket[DHTID(3)] == "c"
    assert bucket.request_ping_node() == (DHTID(2), "b")
    assert bucket.request_ping_node() == (DHTID(1), "a")
    assert bucket.request_ping_node() is None  # everyone was already handed out


def test_kbucket_removal_promotes_most_recent_replacement():
    bucket = KBucket(DHTID.MIN, DHTID.MAX, size=2)
    for i, peer_id in enumerate("abcd"):
        bucket.add_or_update_node(DHTID(i), peer_id)
    assert bucket.remove(DHTID(0)) == (DHTID(3), "d")
    assert list(bucket.nodes.items()) == [(1, "b"), (3, "d")]
    assert list(bucket.replacements.items()) == [(2, "c")]
    with pytest.raises(KeyError):
        del bucket[DHTID(0)]


def test_kbucket_replacement_list_is_bounded():
    bucket = KBucket(DHTID.MIN, DHTID.MAX, size=2)
    for i in range(10):
        bucket.add_or_update_node(DHTID(i), make_peer_id(i))
    assert len(bucket) == 2 and list(bucket.replacements) == [8, 9]


def test_kbucket_split_distributes_nodes_by_range():
    bucket = KBucket(0, 16, size=4)
    for i in (1, 9, 3, 12):
        bucket.add_or_update_node(DHTID(i), make_peer_id(i))
    left, right = bucket.split()
    assert (left.lower, left.upper, right.lower, right.upper) == (0, 8, 8, 16)
    assert list(left.nodes) == [1, 3] and list(right.nodes) == [9, 12]
    assert left.depth == right.depth == 1


def test_routing_table_ignores_own_id():
    table = RoutingTable(DHTID(7), bucket_size=4, depth_modulo=5)
    assert table.add_or_update_node(DHTID(7), make_peer_id("self")) is None
    assert len(table) == 0 and DHTID(7) not in table


def test_routing_table_lookup_both_ways():
    table = RoutingTable(DHTID.generate(), bucket_size=20, depth_modulo=5)
    node_id, peer = DHTID.generate(), make_peer_id("peer")
    table[node_id] = peer
    assert table[node_id] == peer and table[peer] == node_id
    assert table.get(node_id=node_id) == peer and table.get(peer_id=peer) == node_id
    assert node_id in table and peer in table
    assert table.get(node_id=DHTID(0), default="none") == "none"
    with pytest.raises(KeyError):
        table[make_peer_id("unknown")]
    with pytest.raises(ValueError):
        table.get(node_id=node_id, peer_id=peer)


def test_routing_table_delete_forgets_both_directions():
    table = RoutingTable(DHTID.generate(), bucket_size=20, depth_modulo=5)
    node_id, peer = DHTID.generate(), make_peer_id("peer")
    table.add_or_update_node(node_id, peer)
    del table[node_id]
    assert node_id not in table and peer not in table and len(table) == 0
    with pytest.raises(KeyError):
        del table[node_id]


def test_peer_with_a_new_node_id_replaces_its_old_entry():
    table = RoutingTable(DHTID.generate(), bucket_size=20, depth_modulo=5)
    old_id, new_id, peer = DHTID.generate(), DHTID.generate(), make_peer_id("peer")
    table.add_or_update_node(old_id, peer)
    table.add_or_update_node(new_id, peer)
    assert old_id not in table and table[peer] == new_id and len(table) == 1


def test_node_with_a_new_peer_id_is_updated():
    table = RoutingTable(DHTID.generate(), bucket_size=20, depth_modulo=5)
    node_id = DHTID.generate()
    table.add_or_update_node(node_id, make_peer_id("old"))
    table.add_or_update_node(node_id, make_peer_id("new"))
    assert table[node_id] == make_peer_id("new") and make_peer_id("old") not in table and len(table) == 1


def test_bucket_containing_own_id_splits_when_full():
    table = RoutingTable(DHTID(0), bucket_size=2, depth_modulo=5)
    for node_id in (DHTID(1), DHTID(2), DHTID(3)):
        assert table.add_or_update_node(node_id, make_peer_id(node_id)) is None
    assert len(table) == 3 and len(table.buckets) > 1
    assert [bucket.lower for bucket in table.buckets] == sorted(bucket.lower for bucket in table.buckets)
    assert table.buckets[0].lower == DHTID.MIN and table.buckets[-1].upper == DHTID.MAX


def test_full_far_bucket_at_depth_multiple_of_depth_modulo_asks_to_ping_stalest_node():
    # own id in the lower half: the upper half [2**159, 2**160) has depth 1; depth_modulo=1 forbids splitting it
    table = RoutingTable(DHTID(0), bucket_size=2, depth_modulo=1)
    far = [DHTID((1 << 159) + i) for i in range(3)]
    assert table.add_or_update_node(far[0], make_peer_id("a")) is None
    assert table.add_or_update_node(far[1], make_peer_id("b")) is None
    assert table.add_or_update_node(far[2], make_peer_id("c")) == (far[0], make_peer_id("a"))
    assert far[2] not in table and len(table) == 2
    del table[far[0]]  # far[0] did not answer the ping
    assert table[far[2]] == make_peer_id("c") and table[make_peer_id("c")] == far[2] and far[0] not in table


def test_holder_of_an_id_covers_active_and_replacement_nodes():
    table = RoutingTable(DHTID(0), bucket_size=2, depth_modulo=1)
    far = [DHTID((1 << 159) + i) for i in range(3)]
    for node_id, name in zip(far, "abc"):
        table.add_or_update_node(node_id, make_peer_id(name))
    assert far[2] not in table  # a replacement node: not routed to, but its id is held
    assert [table.holder_of(node_id) for node_id in far] == [make_peer_id(name) for name in "abc"]
    assert table.holder_of(DHTID(1 << 158)) is None


def test_full_far_bucket_at_depth_not_multiple_of_depth_modulo_splits():
    table = RoutingTable(DHTID(0), bucket_size=2, depth_modulo=5)
    far = [DHTID((1 << 159) + (i << 157)) for i in range(3)]
    for i, node_id in enumerate(far):
        assert table.add_or_update_node(node_id, make_peer_id(i)) is None
    assert all(node_id in table for node_id in far)


def test_buckets_tile_the_id_space_and_respect_bucket_size():
    rng = random.Random(1)
    table = RoutingTable(DHTID(rng.getrandbits(160)), bucket_size=4, depth_modulo=3)
    for i, node_id in enumerate(random_ids(2000, rng)):
        table.add_or_update_node(node_id, make_peer_id(i))
    for bucket in table.buckets:
        assert bucket.upper - bucket.lower == 2 ** (160 - bucket.depth)
        assert len(bucket) <= 4
    assert len(table) == sum(len(bucket) for bucket in table.buckets)
    assert all(left.upper == right.lower for left, right in zip(table.buckets, table.buckets[1:]))
    far_depths = [bucket.depth for bucket in table.buckets if not bucket.covers(table.node_id)]
    assert max(far_depths) > 3 and len(table.buckets) < 2000 // 4


def test_nearest_neighbors_match_brute_force():
    rng = random.Random(2)
    table = RoutingTable(DHTID(rng.getrandbits(160)), bucket_size=5, depth_modulo=5)
    for i, node_id in enumerate(random_ids(1000, rng)):
        table.add_or_update_node(node_id, make_peer_id(i))
    all_nodes = list(table.items())
    for query in random_ids(50, rng) + [table.node_id]:
        for k in (1, 5, 17, len(all_nodes) + 3):
            expected = sorted(all_nodes, key=lambda item: item[0] ^ query)[:k]
            assert table.get_nearest_neighbors(query, k) == expected


def test_nearest_neighbors_exclude_one_or_several_ids():
    rng = random.Random(3)
    table = RoutingTable(DHTID(rng.getrandbits(160)), bucket_size=20, depth_modulo=5)
    ids = random_ids(30, rng)
    for i, node_id in enumerate(ids):
        table.add_or_update_node(node_id, make_peer_id(i))
    query = ids[0]
    nearest = [node_id for node_id, _ in table.get_nearest_neighbors(query, 3)]
    assert nearest[0] == query
    assert [node_id for node_id, _ in table.get_nearest_neighbors(query, 2, exclude=query)] == nearest[1:3]
    assert [node_id for node_id, _ in table.get_nearest_neighbors(query, 1, exclude=nearest[:2])] == nearest[2:3]
    assert table.get_nearest_neighbors(query, 0) == []


def test_removed_nodes_are_not_returned_as_neighbors():
    rng = random.Random(4)
    table = RoutingTable(DHTID(rng.getrandbits(160)), bucket_size=20, depth_modulo=5)
    ids = random_ids(10, rng)
    for i, node_id in enumerate(ids):
        table.add_or_update_node(node_id, make_peer_id(i))
    del table[ids[3]]
    returned = {node_id for node_id, _ in table.get_nearest_neighbors(ids[3], 100)}
    assert returned == set(ids) - {ids[3]}


def test_dhtid_survives_pickling():
    node_id = DHTID.generate("key")
    restored = pickle.loads(pickle.dumps(node_id))
    assert restored == node_id and isinstance(restored, DHTID)


def test_nearest_neighbors_of_a_large_table_are_fast():
    rng = random.Random(5)
    table = RoutingTable(DHTID(rng.getrandbits(160)), bucket_size=20, depth_modulo=5)
    for i, node_id in enumerate(random_ids(5000, rng)):
        table.add_or_update_node(node_id, make_peer_id(i))
    queries = random_ids(200, rng)
    started = time.perf_counter()
    for query in queries:
        table.get_nearest_neighbors(query, 20)
    per_query = (time.perf_counter() - started) / len(queries)
    assert len(table) > 500 and per_query < 1e-3  # sorting the whole table by distance would take ~1 ms


def test_one_peer_holds_at_most_one_replacement_slot_of_a_bucket():
    table = RoutingTable(DHTID(0), bucket_size=2, depth_modulo=1)  # the far half [2**159, 2**160) cannot split
    far = [DHTID((1 << 159) + i) for i in range(10)]
    table.add_or_update_node(far[0], make_peer_id("a"))
    table.add_or_update_node(far[1], make_peer_id("b"))
    table.add_or_update_node(far[2], make_peer_id("honest"))  # the bucket is full: a replacement node
    for node_id in far[3:]:  # one peer introduces itself under many ids of that bucket
        table.add_or_update_node(node_id, make_peer_id("attacker"))
    bucket = table.buckets[table.bucket_index_for(far[0])]
    assert bucket.replacements == {far[2]: make_peer_id("honest"), far[-1]: make_peer_id("attacker")}
