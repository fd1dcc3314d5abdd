"""DecentralizedAverager options that shape the all-reduce, with real averagers: ``bandwidth``, ``min_vector_size``
and ``tensor_infos``."""

import json
import pathlib

import pytest
import torch
from averager_helpers import FAST, averagers_on, dht_swarm

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.compression import CompressionInfo, Float16Compression, RoleAdaptiveCompression, TensorRole

SIZE = 700  # elements: shares of 1/7 are whole numbers


class RecordingAverager(DecentralizedAverager):
    """Writes how many elements each group member reduces in its round to ``<record_dir>/<own peer id>.json``."""

    record_dir: pathlib.Path

    async def _collect_deltas(self, runner):
        counts = dict(zip(map(str, runner.ordered_peer_ids), runner.container.peer_element_counts))
        (self.record_dir / f"{self.peer_id}.json").write_text(json.dumps(counts))
        return await DecentralizedAverager._collect_deltas(runner)


def _run_round(tmp_path, values, **options_per_peer):
    """One round of len(values) recording averagers; returns (element counts by peer index, local tensors after)."""
    with dht_swarm(len(values)) as dhts:
        averagers = []
        try:
            for index, (dht, value) in enumerate(zip(dhts, values)):
                options = {key: per_peer[index] for key, per_peer in options_per_peer.items()}
                averager = RecordingAverager(
                    [torch.full((SIZE,), value)], dht, prefix="opts", start=False, target_group_size=len(values),
                    **FAST, **options,
                )  # fmt: skip
                averager.record_dir = tmp_path
                averager.run_in_background(await_ready=True)
                averagers.append(averager)
            controls = [averager.step(wait=False) for averager in averagers]
            for control in controls:
                control.result(timeout=60)
            index_of = {str(averager.peer_id): index for index, averager in enumerate(averagers)}
            records = [json.loads((tmp_path / f"{averager.peer_id}.json").read_text()) for averager in averagers]
            assert all(record == records[0] for record in records)  # every member cut the vector the same way
            counts = [0] * len(averagers)
            for peer, count in records[0].items():
                counts[index_of[peer]] = count
            results = []
            for averager in averagers:
                with averager.get_tensors() as tensors:
                    results.append(tensors[0].clone())
            return counts, results
        finally:
            for averager in averagers:
                averager.shutdown()


def _assert_averaged(results, values):
    for result in results:
        assert torch.allclose(result, torch.full((SIZE,), sum(values) / len(values)), atol=1e-5)


@pytest.mark.timeout(60)
def test_without_declared_bandwidths_every_peer_reduces_an_equal_share(tmp_path):
    values = (0.0, 3.0, 6.0)
    counts, results = _run_round(tmp_path, values)
    assert sorted(counts) == [SIZE // 3, SIZE // 3, SIZE // 3 + 1]  # the first in the group's order gets the rest
    _assert_averaged(results, values)


@pytest.mark.timeout(60)
def test_declared_bandwidths_give_the_faster_peer_a_larger_share(tmp_path):
    # min-max LP for bandwidths 1, 1, 1.5 in a group of 3: shares 1/7, 1/7 and 5/7
    values = (0.0, 3.0, 6.0)
    counts, results = _run_round(tmp_path, values, bandwidth=[1.0, 1.0, 1.5])
    assert counts == [100, 100, 500]
    _assert_averaged(results, values)


@pytest.mark.timeout(60)
def test_a_peer_declaring_zero_bandwidth_reduces_nothing(tmp_path):
    values = (0.0, 3.0, 6.0)
    counts, results = _run_round(tmp_path, values, bandwidth=[None, None, 0.0])
    assert counts == [SIZE // 2, SIZE // 2, 0]
    _assert_averaged(results, values)  # it still sends its tensors and receives the average


@pytest.mark.timeout(60)
def test_min_vector_size_hands_shares_below_it_to_the_other_peers(tmp_path):
    values = (0.0, 3.0, 6.0)
    options = dict(bandwidth=[1.0, 1.0, 1.5], min_vector_size=[150] * 3)  # the 100-element shares are too small
    counts, results = _run_round(tmp_path, values, **options)
    assert counts == [0, 0, SIZE]
    _assert_averaged(results, values)


@pytest.mark.timeout(60)
def test_tensor_infos_choose_the_compression_of_each_tensor():
    """The roles in ``tensor_infos`` make a role-adaptive codec send the gradient in float16, the parameter raw."""
    generator = torch.Generator().manual_seed(0)
    tensors = [[torch.randn(500, generator=generator), torch.randn(500, generator=generator)] for _ in range(2)]
    expected = [(a + b) / 2 for a, b in zip(*tensors)]
    roles = (TensorRole.GRADIENT, TensorRole.PARAMETER)
    compression = RoleAdaptiveCompression(gradient=Float16Compression())  # other roles: no compression
    with dht_swarm(2) as dhts:
        averagers = []
        try:
            for dht, peer_tensors in zip(dhts, tensors):
                infos = [CompressionInfo.from_tensor(tensor, role=role) for tensor, role in zip(peer_tensors, roles)]
                options = dict(target_group_size=2, compression=compression, tensor_infos=infos, **FAST)
                averagers.append(DecentralizedAverager(peer_tensors, dht, prefix="infos", start=True, **options))
            for control in [averager.step(wait=False) for averager in averagers]:
                control.result(timeout=60)
            for averager in averagers:
                with averager.get_tensors() as (gradient, parameter):
                    gradient_error = (gradient - expected[0]).abs().max().item()
                    parameter_error = (parameter - expected[1]).abs().max().item()
                assert 1e-5 < gradient_error < 1e-2  # rounded to float16 on the wire
                assert parameter_error < 1e-6  # sent exactly
        finally:
            for averager in averagers:
                averager.shutdown()


@pytest.mark.timeout(60)
def test_peers_that_cut_the_vector_differently_refuse_each_others_parts():
    """part_size_bytes must match: a member with other parts is refused and excluded, nobody's tensors are mixed."""
    tensors = [[torch.full((3000,), 0.0)], [torch.full((3000,), 2.0)]]
    options = dict(target_group_size=2, part_size_bytes=[1024, 4096], sender_timeout=2.0, reducer_timeout=4.0)
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, **options) as averagers:
        for control in [averager.step(wait=False) for averager in averagers]:
            assert len(control.result(timeout=30)) == 2  # the round "succeeds" with the other member excluded
        for averager, value in zip(averagers, (0.0, 2.0)):
            with averager.get_tensors() as (tensor,):
                assert torch.equal(tensor, torch.full((3000,), value))
