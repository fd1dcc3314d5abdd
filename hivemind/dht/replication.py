"""Which locally stored keys a newly seen peer should receive, as a pure decision over node ids."""

from typing import Callable, Iterable, List, Sequence

NearestNeighbors = Callable[
    [int], Sequence[int]
]  # key id -> node ids of the current nearest neighbours, nearest first


def should_replicate_to(key_id: int, new_node_id: int, own_node_id: int, neighbor_ids: Sequence[int]) -> bool:
    """
    Push a key to a new peer when that peer is closer to the key than the farthest of the current nearest neighbours
    (it would be one of the replicas) while this node is closer than the nearest of them (so this node, not another
    neighbour, is responsible for handing it over); always push when there are no neighbours yet.
    """
    if not neighbor_ids:
        return True
    new_distance, own_distance = key_id ^ new_node_id, key_id ^ own_node_id
    distances = [key_id ^ neighbor for neighbor in neighbor_ids]
    return new_distance < max(distances) and own_distance < min(distances)


def keys_to_replicate(
    key_ids: Iterable[int], new_node_id: int, own_node_id: int, nearest_neighbors: NearestNeighbors
) -> List[int]:
    """The stored keys for which :func:`should_replicate_to` holds; ``nearest_neighbors`` must exclude the new peer."""
    return [
        key_id
        for key_id in key_ids
        if should_replicate_to(key_id, new_node_id, own_node_id, nearest_neighbors(key_id))
    ]
