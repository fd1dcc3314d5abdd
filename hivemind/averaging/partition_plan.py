"""Where each part of the averaged vector goes: a pure function of tensor sizes, part sizes and peer shares.

Peer ``j`` owns a contiguous range of the concatenated, flattened tensors; each tensor is cut into parts of a fixed
number of elements, and a part belongs to the peer whose range covers most of it (the earliest peer on ties).
"""

from __future__ import annotations

import bisect
import math
from typing import List, NamedTuple, Sequence

__all__ = ["PartSpec", "part_size_elements", "plan_parts"]


class PartSpec(NamedTuple):
    """One part of the averaged vector: elements ``start:stop`` of flattened tensor ``tensor_index``."""

    tensor_index: int
    start: int
    stop: int
    reducer: int  # index (in the group order) of the peer that averages this part
    index: int  # position of this part among the parts of that reducer (the order in which it is sent)
    part_index: int  # position of this part within its tensor (CompressionInfo.part_index)
    global_index: int  # position among all parts

    @property
    def numel(self) -> int:
        return self.stop - self.start


def part_size_elements(part_size_bytes: int, element_size: int, compression_ratio: float) -> int:
    """Elements per part so that a compressed part takes about ``part_size_bytes`` (at least one element)."""
    if part_size_bytes <= 0:
        raise ValueError(f"part_size_bytes must be positive, got {part_size_bytes}")
    if not compression_ratio > 0:
        raise ValueError(f"compression ratio must be positive, got {compression_ratio}")
    return max(1, int(math.floor(part_size_bytes / (element_size * compression_ratio))))


def plan_parts(
    tensor_numels: Sequence[int], part_sizes: Sequence[int], peer_element_counts: Sequence[int]
) -> List[PartSpec]:
    """Cut each tensor into parts of ``part_sizes[i]`` elements and give each part to a reducer.

    Peer ``j`` owns the elements ``[sum(counts[:j]), sum(counts[:j+1]))`` of the concatenated tensors; a part that
    crosses the boundary between peers goes to the peer that owns most of its elements (the earliest on ties).
    """
    if sum(peer_element_counts) != sum(tensor_numels):
        raise ValueError(f"peer element counts {list(peer_element_counts)} do not add up to {sum(tensor_numels)}")
    pivots = [0]
    for count in peer_element_counts:
        pivots.append(pivots[-1] + count)
    parts: List[PartSpec] = []
    parts_per_peer = [0] * len(peer_element_counts)
    offset = 0
    for tensor_index, (numel, part_size) in enumerate(zip(tensor_numels, part_sizes)):
        for part_index, start in enumerate(range(0, numel, part_size)):
            stop = min(start + part_size, numel)
            reducer = _largest_overlap(pivots, offset + start, offset + stop)
            parts.append(PartSpec(tensor_index, start, stop, reducer, parts_per_peer[reducer], part_index, len(parts)))
            parts_per_peer[reducer] += 1
        offset += numel
    return parts


def _largest_overlap(pivots: Sequence[int], begin: int, end: int) -> int:
    peer = bisect.bisect_right(pivots, begin) - 1  # the last peer whose range starts at or before `begin`
    while pivots[peer + 1] <= begin:  # skip peers with empty ranges
        peer += 1
    best, best_overlap = peer, -1
    while peer < len(pivots) - 1 and pivots[peer] < end:
        overlap = min(end, pivots[peer + 1]) - max(begin, pivots[peer])
        if overlap > best_overlap:
            best, best_overlap = peer, overlap
        peer += 1
    return best
