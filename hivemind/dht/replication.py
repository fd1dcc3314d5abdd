"""Which locally stored keys a newly seen peer should receive (a pure decision over node ids), and in which batches."""

from typing import Callable, Iterable, Iterator, List, Sequence, Tuple

from hivemind.dht.rate_limit import STORE_BYTES_PER_ITEM, store_item_cost
from hivemind.dht.request_checks import IS_REGULAR_VALUE, dictionary_layout
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import ValueWithExpiration

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


def replication_cost(item: ValueWithExpiration) -> float:
    """
    What storing one replicated item costs the receiver's store rate limit (see rate_limit.py and the receiver's
    store handling): one item, plus what decoding its value costs; for a whole dictionary, one per entry plus what
    decoding its subkeys and entry values costs, or one per STORE_BYTES_PER_ITEM of its bytes if that is more.
    """
    if not isinstance(item.value, DictionaryDHTValue):
        return store_item_cost(IS_REGULAR_VALUE, item.value)
    encoded = MSGPackSerializer.dumps(item.value)
    layout = dictionary_layout(encoded)
    return 1 + len(item.value) + max(len(encoded) / STORE_BYTES_PER_ITEM, 0.0 if layout is None else layout[1])


def replication_nbytes(item: ValueWithExpiration) -> int:
    """About how many bytes one replicated item adds to a store request (key, value or dictionary, and overhead)."""
    value = item.value
    return 64 + (value.nbytes if isinstance(value, DictionaryDHTValue) else len(value))


def replication_batches(
    selected: Sequence[Tuple[DHTID, ValueWithExpiration]], max_cost: int, max_bytes: int
) -> Iterator[Tuple[List[Tuple[DHTID, ValueWithExpiration]], int]]:
    """
    Split the (key, entry) pairs handed to a newcomer into consecutive store requests of at most ``max_cost`` (see
    :func:`replication_cost`) and ``max_bytes`` each (an item exceeding either goes alone); yields (batch, its cost).
    """
    batch, batch_cost, batch_bytes = [], 0, 0
    for key_id, item in selected:
        cost, nbytes = replication_cost(item), replication_nbytes(item)
        if batch and (batch_cost + cost > max_cost or batch_bytes + nbytes > max_bytes):
            yield batch, batch_cost
            batch, batch_cost, batch_bytes = [], 0, 0
        batch.append((key_id, item))
        batch_cost += cost
        batch_bytes += nbytes
    if batch:
        yield batch, batch_cost
