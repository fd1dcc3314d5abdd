"""DecentralizedAverager: exact weighted averages, modes, gather results, options and their validation."""

import gc
import math

import pytest
import torch
from averager_helpers import FAST, averagers_on, dht_swarm, weighted_mean

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import Float16Compression, Uniform8BitQuantization
from hivemind.dht import DHT


def _peer_tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(100, generator=generator), torch.randn(3, 5, generator=generator)]


def _run_steps(averagers, timeout=60, **step_kwargs_per_peer):
    controls = []
    for index, averager in enumerate(averagers):
        kwargs = {key: values[index] for key, values in step_kwargs_per_peer.items()}
        controls.append(averager.step(wait=False, **kwargs))
    return [control.result(timeout=timeout) for control in controls]


def _local(averager):
    with averager.get_tensors() as tensors:
        return [tensor.clone() for tensor in tensors]


def _assert_tensors(actual, expected):
    for got, want in zip(actual, expected):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_peers", [2, 3, 8])
def test_weighted_average_is_exact(num_peers):
    tensors = [_peer_tensors(i) for i in range(num_peers)]
    originals = [[t.clone() for t in peer] for peer in tensors]
    weights = [float(i + 1) for i in range(num_peers)]
    with dht_swarm(num_peers) as dhts, averagers_on(dhts, tensors, target_group_size=num_peers) as averagers:
        results = _run_steps(averagers, weight=weights, gather=list(range(num_peers)))
        expected = [weighted_mean([peer[k] for peer in originals], weights) for k in range(2)]
        for averager in averagers:
            _assert_tensors(_local(averager), expected)
        everyone = {averager.peer_id: index for index, averager in enumerate(averagers)}
        assert all(result == everyone for result in results)


@pytest.mark.timeout(120)
def test_uneven_groups_average_within_each_group():
    num_peers = 5
    tensors = [[torch.full((10,), float(i))] for i in range(num_peers)]
    with dht_swarm(num_peers) as dhts, averagers_on(dhts, tensors, target_group_size=3) as averagers:
        results = _run_steps(averagers, gather=list(range(num_peers)))
        groups = [frozenset(result.values()) for result in results]
        for index, group in enumerate(groups):  # every member of a group saw the same group, which includes it
            assert index in group and all(groups[member] == group for member in group), groups
        assert sorted(len(group) for group in set(groups)) == [2, 3]  # five peers, groups of at most three
        for averager, result in zip(averagers, results):
            members = sorted(result.values())
            _assert_tensors(_local(averager), [torch.full((10,), sum(members) / len(members))])


@pytest.mark.timeout(120)
def test_client_and_aux_peers():
    tensors = [[torch.full((20,), float(v))] for v in (1, 2, 6, 100)]
    with dht_swarm(4, client_mode=[False, False, True, False]) as dhts:
        with averagers_on(dhts, tensors, target_group_size=4, auxiliary=[False, False, False, True]) as averagers:
            assert [a.mode.name for a in averagers] == ["NODE", "NODE", "CLIENT", "AUX"]
            results = _run_steps(averagers)
            assert all(len(result) == 4 for result in results)
            for averager in averagers[:3]:
                _assert_tensors(_local(averager), [torch.full((20,), 3.0)])  # (1 + 2 + 6) / 3, aux excluded
            _assert_tensors(_local(averagers[3]), [torch.full((20,), 100.0)])  # aux peers receive nothing


@pytest.mark.timeout(60)
def test_zero_weight_peer_takes_the_average_of_the_others():
    tensors = [[torch.full((8,), float(v))] for v in (1, 3, 1000)]
    with dht_swarm(3) as dhts, averagers_on(dhts, tensors, target_group_size=3) as averagers:
        _run_steps(averagers, weight=[1.0, 1.0, 0.0])
        for averager in averagers:
            _assert_tensors(_local(averager), [torch.full((8,), 2.0)])


@pytest.mark.timeout(60)
def test_averaging_alpha_moves_part_of_the_way():
    tensors = [[torch.full((8,), 0.0)], [torch.full((8,), 4.0)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2, averaging_alpha=0.25) as averagers:
        _run_steps(averagers)
        _assert_tensors(_local(averagers[0]), [torch.full((8,), 0.5)])
        _assert_tensors(_local(averagers[1]), [torch.full((8,), 3.5)])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compression, tolerance", [(Float16Compression(), 1e-2), (Uniform8BitQuantization(), 0.1)])
def test_compressed_parts_give_the_average_within_codec_error(compression, tolerance):
    tensors = [_peer_tensors(0), _peer_tensors(1)]
    expected = [(a + b) / 2 for a, b in zip(*tensors)]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2, compression=compression) as averagers:
        _run_steps(averagers)
        for averager in averagers:
            for got, want in zip(_local(averager), expected):
                assert (got - want).abs().max() < tolerance


@pytest.mark.timeout(60)
def test_changes_made_through_get_tensors_are_averaged():
    tensors = [[torch.zeros(4)], [torch.zeros(4)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2) as averagers:
        with averagers[0].get_tensors() as local:
            local[0].fill_(10.0)
        _run_steps(averagers)
        _assert_tensors(_local(averagers[1]), [torch.full((4,), 5.0)])


class FailingAverager(DecentralizedAverager):
    """Receives part of the result, then the round fails."""

    @staticmethod
    async def _collect_deltas(runner):
        async for _delta in runner:
            raise AllreduceException("simulated failure after the first tensor")
        return []


@pytest.mark.timeout(60)
def test_failed_round_leaves_local_tensors_untouched():
    tensors = [[torch.zeros(16), torch.zeros(4)], [torch.ones(16), torch.ones(4)]]
    with dht_swarm(2) as dhts:
        averagers = [
            FailingAverager(peer, dht, prefix="fail", start=True, target_group_size=2, **FAST)
            for dht, peer in zip(dhts, tensors)
        ]
        try:
            controls = [averager.step(wait=False, allow_retries=False) for averager in averagers]
            for control in controls:
                with pytest.raises(AllreduceException, match="simulated failure"):
                    control.result(timeout=30)
            _assert_tensors(_local(averagers[0]), [torch.zeros(16), torch.zeros(4)])
            _assert_tensors(_local(averagers[1]), [torch.ones(16), torch.ones(4)])
        finally:
            for averager in averagers:
                averager.shutdown()


@pytest.mark.timeout(60)
def test_lonely_step_fails_with_a_reason_at_its_timeout():
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(3)]]) as (averager,):
        with pytest.raises(AllreduceException, match="could not find a group"):
            averager.step(timeout=2.0)


@pytest.mark.timeout(60)
def test_group_bits_can_be_read_and_set():
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(3)]], initial_group_bits="10") as (averager,):
        assert averager.get_group_bits() == "10"
        averager.set_group_bits("0110")
        assert averager.get_group_bits() == "0110"
        with pytest.raises(ValueError, match="0 and 1"):
            averager.set_group_bits("2")


@pytest.fixture(scope="module")
def lone_dht():
    with DHT(start=True) as dht:
        yield dht


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prefix="with.dot"), "without dots"),
        (dict(auxiliary=True, client_mode=True), "both auxiliary and in client mode"),
        (dict(sender_timeout=2.0, reducer_timeout=1.0), "must exceed sender_timeout"),
        (dict(bandwidth=float("inf")), "bandwidth"),
        (dict(bandwidth=1e39), "bandwidth"),
        (dict(initial_group_bits="012"), "initial_group_bits"),
        (dict(target_group_size=1, min_group_size=2), "target_group_size"),
    ],
)
def test_invalid_options_are_refused_with_a_reason(lone_dht, options, message):
    options = {"prefix": "valid", **options}
    with pytest.raises(ValueError, match=message):
        DecentralizedAverager([torch.zeros(3)], lone_dht, start=False, **options)


def test_argument_errors_are_also_assertion_errors(lone_dht):
    with pytest.raises(AssertionError):
        DecentralizedAverager([torch.zeros(3)], lone_dht, start=False, prefix="a.b")


def test_client_mode_averager_cannot_share_state(lone_dht):
    averager = DecentralizedAverager([torch.zeros(3)], lone_dht, start=False, prefix="p", client_mode=True)
    assert not averager.allow_state_sharing
    with pytest.raises(ValueError, match="cannot share its state"):
        averager.allow_state_sharing = True
    with pytest.raises(ValueError, match="non-zero priority"):
        averager.state_sharing_priority = 1.0


def test_non_leaf_tensor_is_refused(lone_dht):
    leaf = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="grad_fn"):
        DecentralizedAverager([leaf * 2], lone_dht, start=False, prefix="p")


def test_schema_hash_and_size(lone_dht):
    averager = DecentralizedAverager([torch.zeros(3)], lone_dht, start=False, prefix="p")
    assert averager.schema_hash.hex() == "6abf970b130f97ecae717ff8e9d86818e9d65312"
    assert averager.total_size == 3 and averager.mode.name == "NODE"


@pytest.mark.timeout(60)
def test_step_argument_errors():
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(3)]]) as (averager,):
        with pytest.raises(AssertionError, match="before the timeout"):
            averager.step(timeout=0.5)  # the default schedule is min_matchmaking_time (1 s) from now
        with pytest.raises(ValueError, match="wait=False"):
            averager.step(require_trigger=True, wait=True)
        with pytest.raises(ValueError, match="weight"):
            averager.step(weight=-1.0, wait=False)
        with pytest.raises(ValueError, match="peers accept at most"):
            averager.step(gather=b"x" * 2**20, wait=False)
        with pytest.raises(TypeError):
            averager.step(gather=object(), wait=False)  # not msgpack-serializable


@pytest.mark.timeout(60)
def test_group_bits_are_reshuffled_after_a_round():
    tensors = [[torch.zeros(4)], [torch.ones(4)]]
    with dht_swarm(2) as dhts:
        with averagers_on(dhts, tensors, target_group_size=2, initial_group_bits="0") as averagers:
            _run_steps(averagers)
            bits = sorted(averager.get_group_bits() for averager in averagers)
            assert bits == ["0", "1"]  # one bucket each: the next round pairs them with other peers


@pytest.mark.timeout(60)
def test_dropped_control_still_completes_the_round():
    tensors = [[torch.zeros(4)], [torch.full((4,), 2.0)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2) as averagers:
        averagers[0].step(wait=False)  # the control is not kept by the caller
        gc.collect()
        (kept,) = averagers[0]._pending_controls  # ...but by the averager, until the step is over
        averagers[1].step(timeout=30)
        kept.result(timeout=30)
        _assert_tensors(_local(averagers[0]), [torch.ones(4)])


@pytest.mark.timeout(60)
def test_an_infinite_allreduce_timeout_averages_without_a_limit():
    tensors = [_peer_tensors(i) for i in range(2)]
    originals = [[t.clone() for t in peer] for peer in tensors]
    with (
        dht_swarm(2) as dhts,
        averagers_on(dhts, tensors, target_group_size=2, allreduce_timeout=math.inf) as averagers,
    ):
        _run_steps(averagers)
        expected = [weighted_mean([peer[k] for peer in originals], [1.0, 1.0]) for k in range(2)]
        for averager in averagers:
            _assert_tensors(_local(averager), expected)
