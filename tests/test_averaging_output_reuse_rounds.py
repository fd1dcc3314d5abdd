"""The all-reduce output reuse and in-place deltas: what a caller may still hold of a round's outputs, and
what later rounds write into memory that earlier rounds used."""

import asyncio
import os

import pytest
import torch
from allreduce_helpers import collect, hivemind_logs, make_connected_peers, make_runner, start_routers

from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.output_buffers import ReusableOutputs
from hivemind.averaging.part_encoding import refuse_non_finite
from hivemind.averaging.partition import AllreduceException, TensorPartContainer
from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression

__all__ = ["hivemind_logs"]  # the fixture, used below

MiB = 2**20
NUMEL = MiB // 2  # 2 MiB of float32: above ReusableOutputs' min_bytes


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize("holder", ["untyped_storage", "typed_storage"])
def test_an_output_whose_storage_object_the_caller_keeps_is_never_reused(holder):
    outputs = ReusableOutputs()
    output = outputs.take(0, NUMEL, torch.float32)
    output.fill_(1.0)
    held = output.untyped_storage() if holder == "untyped_storage" else output.storage()
    del output
    other = outputs.take(0, NUMEL, torch.float32)
    other.fill_(2.0)
    if holder == "untyped_storage":
        assert float(torch.empty(0, dtype=torch.float32).set_(held)[0]) == 1.0  # what the caller holds is untouched
    else:
        assert float(held[0]) == 1.0


def _read_after_reuse(queue, ready, reused, results) -> None:
    tensor = queue.get()
    ready.set()
    reused.wait(30)
    results.put(float(tensor[0]))


@pytest.mark.timeout(60)
def test_an_output_shared_with_another_process_is_never_reused():
    import torch.multiprocessing as torch_mp  # registers the reductions that share tensors' memory

    context = torch_mp.get_context("fork")
    queue, results = context.SimpleQueue(), context.SimpleQueue()
    ready, reused = context.Event(), context.Event()
    reader = context.Process(target=_read_after_reuse, args=(queue, ready, reused, results), daemon=True)
    reader.start()
    try:
        outputs = ReusableOutputs()
        output = outputs.take(0, NUMEL, torch.float32)
        output.fill_(1.0)
        queue.put(output)
        assert ready.wait(30)
        del output
        other = outputs.take(0, NUMEL, torch.float32)
        other.fill_(2.0)
        reused.set()
        assert results.get() == 1.0  # the other process still holds the first round's output
    finally:
        reader.join(10)
        if reader.is_alive():
            reader.kill()


async def test_a_refused_delta_in_a_reused_output_leaves_no_stale_or_non_finite_value():
    """Round 1 fills the pooled output with its deltas; round 2 reuses it, refuses a NaN delta and loses a reducer:
    its output holds only round 2's accepted deltas and zeros (local values), nothing of round 1 nor the NaN."""
    local = torch.randn(NUMEL)
    pool = ReusableOutputs()
    first = TensorPartContainer([local], [1.0, 1.0], part_size_bytes=MiB // 4, output_buffers=pool)
    for peer_index, parts in enumerate(first.parts_by_peer):
        for k, part in enumerate(parts):
            first.register_processed_part(peer_index, k, torch.full((part.numel,), 123.0))
    (delta,) = [d async for d in first.iterate_output_tensors()]
    address = delta.data_ptr()
    del delta, first

    second = TensorPartContainer([local], [1.0, 1.0], part_size_bytes=MiB // 4, output_buffers=pool)
    parts = second.parts_by_peer[0]
    assert len(parts) >= 2
    second.register_processed_part(0, 0, torch.ones(parts[0].numel))
    bad = torch.ones(parts[1].numel)
    bad[7] = float("nan")
    with pytest.raises(AllreduceException, match="inf/NaN"):
        second.register_processed_part(
            0, 1, bad, check=lambda stored: refuse_non_finite(stored, second.input_part(parts[1]), what="delta 1")
        )
    second.register_failed_reducer(0)
    second.register_failed_reducer(1)
    (delta,) = [d async for d in second.iterate_output_tensors()]
    assert delta.data_ptr() == address and pool.reused == 1
    expected = torch.zeros(NUMEL)
    expected[parts[0].start : parts[0].stop] = 1.0
    assert torch.equal(delta, expected)


def _exact_average(tensors_by_peer, weights):
    total = sum(weights)
    return [
        sum(w * tensors[i].double() for w, tensors in zip(weights, tensors_by_peer)) / total
        for i in range(len(tensors_by_peer[0]))
    ]


@pytest.mark.timeout(120)
async def test_rounds_that_reuse_outputs_stay_exact_with_weights_uneven_shares_and_dtypes(p2p_factory):
    """Four peers (one AUX, one CLIENT), weights and uneven shares, float64/bfloat16/int64/float32 tensors of at
    least 1 MiB: every round's results are the exact weighted average, although each round writes into the memory
    of the last one and the reducers write deltas over the received parts."""
    peers = await make_connected_peers(p2p_factory, 4)
    routers = await start_routers(peers)
    modes = [AveragingMode.NODE, AveragingMode.NODE, AveragingMode.AUX, AveragingMode.CLIENT]
    fractions = [0.5, 0.2, 0.3, 0.0]
    weights = [1.0, 3.0, 0.0, 0.5]
    pools = [ReusableOutputs() for _ in peers]
    senders = [i for i, mode in enumerate(modes) if mode != AveragingMode.AUX]
    for round_index in range(3):
        generator = torch.Generator().manual_seed(round_index)
        tensors = {
            i: [
                torch.randn(MiB // 2, generator=generator).to(torch.bfloat16),  # first: see the test below
                torch.randn(MiB // 4, dtype=torch.float64, generator=generator),
                torch.randint(-1000, 1000, (MiB // 8,), generator=generator),
                torch.randn(MiB // 3, generator=generator),
            ]
            for i in senders
        }
        tensors_of = [tensors.get(i) or [torch.zeros_like(t) for t in tensors[0]] for i in range(len(peers))]
        group_id = os.urandom(20)
        runners = [
            make_runner(
                peer, router, peers, group_id, tensors_of[i], peer_fractions=fractions, modes=modes,
                weight=weights[i], output_buffers=pools[i],
            )
            for i, (peer, router) in enumerate(zip(peers, routers))
        ]  # fmt: skip
        deltas = await asyncio.gather(*(collect(runner) for runner in runners))
        expected = _exact_average([tensors[i] for i in senders], [weights[i] for i in senders])
        for i in senders:
            results = [local + delta for local, delta in zip(tensors[i], deltas[i])]
            assert torch.allclose(results[0].double(), expected[0], rtol=0, atol=5e-2)
            assert torch.allclose(results[1], expected[1], rtol=0, atol=1e-12)
            assert torch.equal(results[2], expected[2].round().long())
            assert torch.allclose(results[3].double(), expected[3], rtol=0, atol=1e-5)
        del deltas, runners, results
    assert all(pools[i].reused > 0 for i in senders)


@pytest.mark.parametrize("case", ["float32_then_bfloat16", "size_adaptive_none_then_float16"])
@pytest.mark.timeout(60)
async def test_a_reducer_whose_parts_mix_raw_and_compressed_ones_averages_all_of_them(p2p_factory, case):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    kwargs = {}
    if case == "float32_then_bfloat16":
        make = [lambda g: torch.randn(1000, generator=g), lambda g: torch.randn(300_000, generator=g).bfloat16()]
    else:  # small tensors uncompressed, large ones as float16: a usual optimizer setting
        make = [lambda g: torch.randn(1000, generator=g), lambda g: torch.randn(300_000, generator=g)]
        kwargs["compression"] = SizeAdaptiveCompression(
            10_000, less=NoCompression(), greater_equal=Float16Compression()
        )
    tensors = [[f(torch.Generator().manual_seed(seed)) for f in make] for seed in range(2)]
    group_id = os.urandom(20)
    runners = [
        make_runner(peer, router, peers, group_id, peer_tensors, **kwargs)
        for peer, router, peer_tensors in zip(peers, routers, tensors)
    ]
    deltas = await asyncio.gather(*(collect(runner) for runner in runners))
    expected = [(a.double() + b.double()) / 2 for a, b in zip(*tensors)]
    for runner, peer_tensors, peer_deltas in zip(runners, tensors, deltas):
        assert runner._failed_reducers == {}
        for local, delta, want in zip(peer_tensors, peer_deltas, expected):
            assert torch.allclose((local + delta).double(), want, rtol=0, atol=5e-2)


@pytest.mark.timeout(60)
async def test_a_part_that_this_peer_cannot_encode_fails_its_step_with_a_logged_error(p2p_factory, hivemind_logs):
    """A local encoding failure is this peer's bug, not a reducer's fault: the step fails loudly instead of
    reporting success with that reducer's parts left at their local values; the other peer still finishes."""
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    tensors = [[torch.randn(100_000, generator=torch.Generator().manual_seed(seed))] for seed in range(2)]
    group_id = os.urandom(20)
    runners = [
        make_runner(
            peer, router, peers, group_id, peer_tensors, compression=Float16Compression(), part_size_bytes=2**16
        )
        for peer, router, peer_tensors in zip(peers, routers, tensors)
    ]

    container = runners[0].container
    (other,) = [index for index, parts in enumerate(container.parts_by_peer) if parts and index != 0]
    assert len(container.parts_by_peer[other]) >= 2
    working_codec = container.compress_part

    def codec_that_fails_after_the_first_part(part):
        if part != container.parts_by_peer[other][0]:
            raise RuntimeError("codec bug")
        return working_codec(part)

    container.compress_part = codec_that_fails_after_the_first_part
    results = await asyncio.gather(*(collect(runner) for runner in runners), return_exceptions=True)
    assert isinstance(results[0], AllreduceException) and "could not encode" in str(results[0])
    assert isinstance(results[1], list) and len(results[1]) == 1  # the other peer's step ends (its parts averaged)
    errors = [r for r in hivemind_logs.records if r.levelname == "ERROR" and "could not encode" in r.getMessage()]
    assert errors, [r.getMessage() for r in hivemind_logs.records]


@pytest.mark.timeout(60)
async def test_a_reducer_that_cancels_in_a_later_round_leaves_local_values_not_the_last_rounds_deltas(p2p_factory):
    """Round 1 fills every peer's pooled outputs; in round 2 one peer cancels before it starts: the others reuse
    those outputs, and the cancelled peer's parts must come back as exactly their local values."""
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    pools = [ReusableOutputs() for _ in peers]
    for round_index in range(2):
        generator = torch.Generator().manual_seed(round_index)
        tensors = [[torch.randn(NUMEL, generator=generator)] for _ in peers]
        group_id = os.urandom(20)
        runners = [
            make_runner(peer, router, peers, group_id, peer_tensors, output_buffers=pool)
            for peer, router, peer_tensors, pool in zip(peers, routers, tensors, pools)
        ]
        if round_index == 1:
            runners[2].finalize(cancel=True)
            deltas = await asyncio.gather(*(collect(runner) for runner in runners[:2]))
        else:
            deltas = await asyncio.gather(*(collect(runner) for runner in runners))
        cancelled_parts = runners[0].container.parts_by_peer[2] if round_index == 1 else []
        for (delta,), (local,) in zip(deltas, tensors):
            assert torch.isfinite(delta).all()
            for part in cancelled_parts:
                assert torch.equal(delta[part.start : part.stop], torch.zeros(part.numel))
            others = torch.ones(NUMEL, dtype=torch.bool)
            for part in cancelled_parts:
                others[part.start : part.stop] = False
            expected = (tensors[0][0] + tensors[1][0] + (tensors[2][0] if round_index == 0 else 0)) / (
                3 if round_index == 0 else 2
            )
            assert torch.allclose((local + delta)[others], expected[others], atol=1e-5)
        del deltas, delta, runners
    assert pools[0].reused == 1 and pools[1].reused == 1


@pytest.mark.timeout(60)
async def test_int32_tensors_near_their_range_limits_average_to_the_same_value_everywhere(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    low, high = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max
    tensors = [[torch.full((3000,), value, dtype=torch.int32)] for value in (low, high, high)]
    group_id = os.urandom(20)
    runners = [
        make_runner(peer, router, peers, group_id, peer_tensors)
        for peer, router, peer_tensors in zip(peers, routers, tensors)
    ]
    deltas = await asyncio.gather(*(collect(runner) for runner in runners))
    expected = round((low + 2 * high) / 3)
    for (local,), (delta,) in zip(tensors, deltas):
        assert torch.equal(local + delta, torch.full((3000,), expected, dtype=torch.int32))
