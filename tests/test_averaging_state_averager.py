"""DecentralizedAverager.load_state_from_peers end to end: averagers in their own processes share their state."""

import time
from typing import Dict

import pytest
import torch
from averager_helpers import FAST, averagers_on, dht_swarm

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.dht import DHT


def _tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(70_000, generator=generator), torch.arange(6, dtype=torch.int64).reshape(2, 3) + seed]


def _wait_for_declarations(dht: DHT, prefix: str, expected: Dict[bytes, object], timeout: float = 30) -> None:
    """Poll the DHT until every peer in ``expected`` declared that value under <prefix>.all_averagers."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        result = dht.get(f"{prefix}.all_averagers", latest=True)
        seen = {} if result is None else {key: entry.value for key, entry in result.value.items()}
        if all(key in seen and seen[key] == value for key, value in expected.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"declarations {expected} never appeared, last seen {seen}")


def _assert_same(tensors, expected):
    assert len(tensors) == len(expected)
    for got, want in zip(tensors, expected):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.timeout(120)
def test_newcomer_loads_the_state_of_the_highest_priority_peer():
    with dht_swarm(4) as dhts:
        donor_tensors = [_tensors(seed) for seed in range(3)]
        with averagers_on(dhts[:3], donor_tensors, prefix="state_e2e") as donors:
            for donor, priority in zip(donors, [1.0, 7.0, 3.0]):
                donor.state_sharing_priority = priority
            _wait_for_declarations(
                dhts[3], "state_e2e", {d.peer_id.to_bytes(): p for d, p in zip(donors, [1.0, 7.0, 3.0])}
            )
            with averagers_on(dhts[3:], [_tensors(100)], prefix="state_e2e") as (newcomer,):
                metadata, tensors = newcomer.load_state_from_peers(timeout=30)
                assert metadata == {"group_key": ""}
                _assert_same(tensors, donor_tensors[1])

                donors[1].allow_state_sharing = False
                _wait_for_declarations(dhts[3], "state_e2e", {donors[1].peer_id.to_bytes(): None})
                _, tensors = newcomer.load_state_from_peers(timeout=30)
                _assert_same(tensors, donor_tensors[2])


@pytest.mark.timeout(120)
def test_no_sharing_peer_gives_none():
    with dht_swarm(2) as dhts:
        tensors = [_tensors(0), _tensors(1)]
        with averagers_on(dhts, tensors, prefix="state_none", allow_state_sharing=[False, True]) as (_, newcomer):
            assert newcomer.load_state_from_peers(timeout=10) is None


@pytest.mark.timeout(120)
def test_donor_with_another_schema_is_skipped():
    with dht_swarm(3) as dhts:
        other_shapes = [torch.zeros(5), torch.zeros(2, 3, dtype=torch.int64)]
        tensors = [other_shapes, _tensors(1), _tensors(2)]
        with averagers_on(dhts, tensors, prefix="state_schema") as (wrong, right, newcomer):
            wrong.state_sharing_priority = 10.0
            _wait_for_declarations(
                dhts[2], "state_schema", {wrong.peer_id.to_bytes(): 10.0, right.peer_id.to_bytes(): 0.0}
            )
            _, downloaded = newcomer.load_state_from_peers(timeout=30)
            _assert_same(downloaded, tensors[1])


class AveragerWithExtraState(DecentralizedAverager):
    """Shares a step counter in the metadata and one more tensor than it averages."""

    def get_current_state(self):
        metadata, tensors, _ = super().get_current_state()
        return dict(metadata, step=42), [*tensors, torch.full((4,), 42.0)], None


@pytest.mark.timeout(120)
def test_overridden_get_current_state_is_what_is_sent():
    with dht_swarm(2) as dhts:
        averagers = [
            AveragerWithExtraState([torch.randn(10)], dht, prefix="state_custom", start=True, **FAST) for dht in dhts
        ]
        try:
            _wait_for_declarations(dhts[1], "state_custom", {averagers[0].peer_id.to_bytes(): 0.0})
            metadata, tensors = averagers[1].load_state_from_peers(timeout=30)
            assert metadata == {"group_key": "", "step": 42}
            with averagers[0].get_tensors() as donor_tensors:
                _assert_same(tensors, [donor_tensors[0].clone(), torch.full((4,), 42.0)])
        finally:
            for averager in averagers:
                averager.shutdown()


def test_client_mode_averager_cannot_share():
    with dht_swarm(2, client_mode=[False, True]) as dhts:
        with pytest.raises(ValueError, match="client"):
            DecentralizedAverager(
                [torch.zeros(3)], dhts[1], prefix="state_client", start=False, allow_state_sharing=True
            )


@pytest.mark.timeout(120)
def test_spawned_donor_serves_several_tensors_to_concurrent_newcomers_exactly():
    generator = torch.Generator().manual_seed(7)
    state = [
        torch.randn(300_000, generator=generator),
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.randn(5, 7, generator=generator, dtype=torch.float64),
        torch.zeros(0, 3),
    ]
    blank = [torch.zeros_like(tensor) for tensor in state]
    options = dict(allow_state_sharing=[True, False, False], start_method=["spawn", "fork", "fork"])
    with dht_swarm(3) as dhts, averagers_on(dhts, [state, blank, blank], prefix="state_spawn", **options) as peers:
        donor, *newcomers = peers
        _wait_for_declarations(dhts[1], "state_spawn", {donor.peer_id.to_bytes(): 0.0})
        futures = [newcomer.load_state_from_peers(wait=False, timeout=60) for newcomer in newcomers]
        for future in futures:
            metadata, tensors = future.result(timeout=90)
            assert metadata == {"group_key": ""}
            _assert_same(tensors, state)
