from collections import OrderedDict, namedtuple

import pytest

from hivemind.utils.nested import nested_compare, nested_flatten, nested_map, nested_pack

Point = namedtuple("Point", ["x", "y"])


def test_flatten_visits_dicts_in_sorted_key_order():
    structure = {"b": [1, (2, 3)], "a": 0, "c": {"z": 5, "y": 4}}
    assert list(nested_flatten(structure)) == [0, 1, 2, 3, 4, 5]


def test_pack_restores_types_and_key_order():
    structure = {"b": [1, (2, Point(3, 4))], "a": OrderedDict(q=5)}
    flat = list(nested_flatten(structure))
    packed = nested_pack([x * 10 for x in flat], structure)
    assert packed == {"b": [10, (20, Point(30, 40))], "a": {"q": 50}}
    assert list(packed) == ["b", "a"]
    assert type(packed["b"]) is list and type(packed["b"][1]) is tuple and type(packed["b"][1][1]) is Point
    assert type(packed["a"]) is OrderedDict


def test_pack_checks_the_number_of_values():
    with pytest.raises(ValueError, match="not enough"):
        nested_pack([1], [0, 0])
    with pytest.raises(ValueError, match="more values"):
        nested_pack([1, 2, 3], [0, 0])


def test_leaf_and_empty_structures():
    assert list(nested_flatten(7)) == [7] and nested_pack([8], 7) == 8
    assert nested_pack([], ([], {})) == ([], {})


def test_nested_map_over_several_structures():
    a = {"x": [1, 2], "y": Point(3, 4)}
    b = {"x": [10, 20], "y": Point(30, 40)}
    assert nested_map(lambda p, q: p + q, a, b) == {"x": [11, 22], "y": Point(33, 44)}


def test_nested_map_rejects_mismatched_structures():
    with pytest.raises(ValueError):
        nested_map(lambda p, q: p, [1, 2], [1, [2]])


def test_nested_compare():
    assert nested_compare({"a": [1, (2,)]}, {"a": [5, (6,)]})
    assert not nested_compare([1, 2], (1, 2))
    assert not nested_compare([1, 2], [1, 2, 3])
    assert not nested_compare({"a": 1}, {"b": 1})
    assert not nested_compare(1, [1])
