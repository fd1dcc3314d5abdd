"""Flatten and rebuild nested structures of lists, tuples (incl. namedtuples) and dicts (sorted-key order)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

__all__ = ["nested_flatten", "nested_pack", "nested_map", "nested_compare"]


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def nested_flatten(t: Any) -> Iterator[Any]:
    """Yield the leaves of ``t`` depth-first; dict values are visited in sorted-key order."""
    if isinstance(t, (list, tuple)):
        for item in t:
            yield from nested_flatten(item)
    elif isinstance(t, dict):
        for key in sorted(t):
            yield from nested_flatten(t[key])
    else:
        yield t


def _rebuild_dict(structure: dict, values: dict) -> dict:
    items = [(key, values[key]) for key in structure]  # keep the structure's own key order
    try:
        return type(structure)(items)
    except TypeError:  # a dict subclass with another constructor (e.g. defaultdict)
        return dict(items)


def _pack(flat: Iterator[Any], structure: Any) -> Any:
    if _is_namedtuple(structure):
        return type(structure)(*[_pack(flat, item) for item in structure])
    if isinstance(structure, (list, tuple)):
        return type(structure)(_pack(flat, item) for item in structure)
    if isinstance(structure, dict):
        return _rebuild_dict(structure, {key: _pack(flat, structure[key]) for key in sorted(structure)})
    try:
        return next(flat)
    except StopIteration:
        raise ValueError("nested_pack: not enough values to fill the structure") from None


def nested_pack(flat: Iterable[Any], structure: Any) -> Any:
    """Inverse of :func:`nested_flatten`: place values of ``flat`` into the shape of ``structure``.

    :raises ValueError: if ``flat`` has fewer or more values than ``structure`` has leaves
    """
    iterator = iter(flat)
    result = _pack(iterator, structure)
    for _ in iterator:
        raise ValueError("nested_pack: more values than leaves in the structure")
    return result


def nested_compare(t: Any, u: Any) -> bool:
    """True iff ``t`` and ``u`` have the same nesting: same container types, lengths and dict keys."""
    if isinstance(t, (list, tuple)):
        if type(t) is not type(u) or len(t) != len(u):
            return False
        return all(nested_compare(a, b) for a, b in zip(t, u))
    if isinstance(t, dict):
        if not isinstance(u, dict) or set(t) != set(u):
            return False
        return all(nested_compare(t[key], u[key]) for key in t)
    return not isinstance(u, (list, tuple, dict))


def nested_map(fn: Callable[..., Any], *t: Any) -> Any:
    """Apply ``fn`` to corresponding leaves of one or more identically nested structures; keep the structure."""
    if not t:
        raise ValueError("nested_map expects at least one structure")
    for other in t[1:]:
        if not nested_compare(t[0], other):
            raise ValueError("nested_map: the structures have different nesting")
    return nested_pack(map(fn, *map(nested_flatten, t)), t[0])
