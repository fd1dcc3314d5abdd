"""A donor's state snapshots without a network: packing tensors into one shared buffer, sharing a snapshot between
overlapping downloads, and cutting tensors into chunks one slice at a time."""

import asyncio
import random
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from hivemind.averaging.state_sharing import StateSharing
from hivemind.averaging.state_snapshot import DonorBusyError, SnapshotCache, pack_tensors, packed_copy
from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    NoCompression,
    SizeAdaptiveCompression,
    Uniform8BitQuantization,
)
from hivemind.utils.streaming import split_for_streaming


def various_tensors():
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(5, 3, generator=generator).t(),  # not contiguous
        torch.arange(7),
        torch.zeros(0, 3),
        torch.tensor([True, False, True]),
        torch.randn(3, generator=generator).to(torch.bfloat16),
        torch.randn(4, generator=generator).requires_grad_(),
        torch.randn(2, generator=generator, dtype=torch.complex64),
        torch.tensor(2.5, dtype=torch.float64),
    ]


def test_packed_tensors_come_back_exact():
    tensors = various_tensors()
    unpacked = pack_tensors(tensors).unpack()
    assert len(unpacked) == len(tensors)
    for got, sent in zip(unpacked, tensors):
        assert got.dtype == sent.dtype and got.shape == sent.shape and got.requires_grad == sent.requires_grad
        assert torch.equal(got.detach(), sent.detach())
        assert got.is_shared()


def test_packed_state_crosses_processes_as_one_small_pickle():
    state = [torch.randn(2**20) for _ in range(4)]  # 16 MiB
    packed = pack_tensors(state)
    assert len(ForkingPickler.dumps(packed)) < 4096  # the data stays in shared memory: one descriptor crosses
    assert len({tensor.untyped_storage().data_ptr() for tensor in packed.unpack()}) == 1


def test_tensors_already_packed_are_not_copied_again_unless_asked():
    views = pack_tensors(various_tensors()).unpack()
    assert pack_tensors(views).buffer.data_ptr() == views[0].untyped_storage().data_ptr()
    copies = packed_copy(views)
    assert copies[0].untyped_storage().data_ptr() != views[0].untyped_storage().data_ptr()
    assert not any(copy.requires_grad for copy in copies)  # detached, like tensor.detach().clone()
    single = torch.ones(10).share_memory_()  # e.g. the only averaged tensor: a copy must not alias it
    (copy,) = packed_copy([single])
    single.add_(1)
    assert torch.equal(copy, torch.ones(10))


def test_packing_refuses_non_tensors():
    with pytest.raises(TypeError, match="state tensor 1"):
        pack_tensors([torch.zeros(1), [1.0, 2.0]])


def counting_source(release: asyncio.Event = None):
    calls = []

    async def get_current_state():
        calls.append(len(calls))
        if release is not None:
            await release.wait()
        return {"call": len(calls)}, [torch.full((3,), float(len(calls)))], None

    return get_current_state, calls


async def test_downloads_starting_together_share_one_snapshot():
    release = asyncio.Event()
    source, calls = counting_source(release)
    cache = SnapshotCache(source, max_age=10.0)
    entered = []

    async def download():
        async with cache.use() as snapshot:
            entered.append(snapshot)
            await release.wait()

    tasks = [asyncio.create_task(download()) for _ in range(4)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*tasks)
    assert len(calls) == 1 and all(snapshot is entered[0] for snapshot in entered)
    assert cache.in_use == []


async def test_snapshot_in_use_is_reused_while_young_and_dropped_after_its_last_download():
    source, calls = counting_source()
    cache = SnapshotCache(source, max_age=10.0)
    async with cache.use() as first:
        async with cache.use() as second:
            assert second is first and first.users == 2
    assert cache.in_use == [] and len(calls) <= 1  # (cancelled before or while it ran)
    async with cache.use() as third:  # nobody streams the old one any more: a fresh snapshot
        assert third is not first and third.metadata == {"call": 2}


async def test_old_snapshot_gives_way_to_a_new_one_up_to_max_snapshots():
    source, calls = counting_source()
    cache = SnapshotCache(source, max_age=0.0, max_snapshots=2)
    async with cache.use() as first, cache.use() as second, cache.use() as third:
        assert first is not second  # too old (max_age 0): a new snapshot
        assert third is second  # two are streamed already: the newest is reused whatever its age
        assert len(cache.in_use) == 2 and len(calls) == 2


async def test_download_is_refused_as_busy_when_every_snapshot_in_use_is_older_than_the_age_cap():
    source, calls = counting_source()
    cache = SnapshotCache(source, max_age=0.0, max_snapshots=2, age_cap=60.0)
    async with cache.use() as first, cache.use() as second:  # two slow downloads keep two snapshots in use
        second.taken_at -= 61.0  # ... for over a minute
        with pytest.raises(DonorBusyError, match="taken 61 s ago"):
            async with cache.use():
                pass
        assert len(calls) == 2 and first.users == 1 and second.users == 1  # nothing taken or held for it
    async with cache.use() as fresh:  # once they end, downloads get a fresh snapshot again
        assert fresh is not second and len(calls) == 3


def test_age_cap_below_max_age_is_refused():
    with pytest.raises(ValueError, match="max_age <= age_cap"):
        SnapshotCache(counting_source()[0], max_age=10.0, age_cap=5.0)


async def test_failed_snapshot_fails_its_waiters_and_the_next_download_tries_again():
    attempts = []

    async def flaky_state():
        attempts.append(1)
        await asyncio.sleep(0)
        if len(attempts) == 1:
            raise RuntimeError("get_current_state failed")
        return None, [], None

    cache = SnapshotCache(flaky_state, max_age=10.0)

    async def download():
        async with cache.use() as snapshot:
            return snapshot

    results = await asyncio.gather(download(), download(), return_exceptions=True)
    assert [type(result) for result in results] == [RuntimeError, RuntimeError]
    assert (await download()).tensors == [] and len(attempts) == 2


async def test_download_that_leaves_while_waiting_does_not_cancel_the_snapshot_for_the_others():
    release = asyncio.Event()
    source, calls = counting_source(release)
    cache = SnapshotCache(source, max_age=10.0)

    async def download():
        async with cache.use() as snapshot:
            return snapshot

    leaving, staying = asyncio.create_task(download()), asyncio.create_task(download())
    await asyncio.sleep(0)
    leaving.cancel()
    release.set()
    assert (await staying).metadata == {"call": 1}
    assert leaving.cancelled() and cache.in_use == [] and len(calls) == 1


def test_mismatched_infos_are_refused():
    async def wrong_infos():
        return None, [torch.zeros(2)], []

    async def run():
        async with SnapshotCache(wrong_infos, max_age=1.0).use():
            pass

    with pytest.raises(ValueError, match="1 tensors but 0 infos"):
        asyncio.run(run())


class _Chunker:
    _compressed_chunks, _compress = StateSharing._compressed_chunks, StateSharing._compress

    def __init__(self, codec):
        self.state_compression = codec


@pytest.mark.parametrize(
    "codec",
    [
        NoCompression(),
        Float16Compression(),
        SizeAdaptiveCompression(1000, NoCompression(), Float16Compression()),
        Uniform8BitQuantization(),
    ],
    ids=["none", "float16", "adaptive", "uniform8bit"],
)
def test_chunks_cut_slice_by_slice_are_byte_identical_to_the_whole_encoding(codec):
    tensors = [
        *various_tensors(),
        torch.randn(100_000),
        torch.arange(40_000),
        torch.randn(16_384),
        torch.randn(16_385),
    ]
    chunker = _Chunker(codec)
    for index, tensor in enumerate(tensors):
        info = CompressionInfo.from_tensor(tensor, key=index)
        sliced = [chunk.SerializeToString() for chunk in chunker._compressed_chunks(tensor, info)]
        whole = [chunk.SerializeToString() for chunk in split_for_streaming(chunker._compress(tensor.detach(), info))]
        assert sliced == whole, f"tensor {index} ({tensor.dtype}, {list(tensor.shape)})"


async def test_shutdown_cancels_a_snapshot_being_taken():
    source, calls = counting_source(asyncio.Event())  # never released
    cache = SnapshotCache(source, max_age=10.0)

    async def download():
        async with cache.use():
            pass

    waiting = asyncio.create_task(download())
    await asyncio.sleep(0)
    await cache.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert cache.in_use == [] and len(calls) <= 1  # (cancelled before or while it ran)


async def test_a_download_leaving_just_as_the_snapshot_is_ready_lets_no_extra_copy_in():
    release = asyncio.Event()
    source, calls = counting_source(release)
    cache = SnapshotCache(source, max_age=0.0, max_snapshots=1)
    finish, got, late = asyncio.Event(), {}, []

    async def download(name):
        async with cache.use() as snapshot:
            got[name] = snapshot
            await finish.wait()

    first = asyncio.create_task(download("first"))
    await asyncio.sleep(0)  # it started a snapshot and waits for it
    (taking,) = [task for task in asyncio.all_tasks() if task.get_name() == "take a state snapshot"]

    def leave_and_arrive(_):  # as the snapshot is ready, the first download leaves and another one arrives
        first.cancel()
        late.append(asyncio.create_task(download("late")))

    taking.add_done_callback(leave_and_arrive)
    second = asyncio.create_task(download("second"))
    await asyncio.sleep(0)  # it waits for the same snapshot
    release.set()
    while len(got) < 2:
        await asyncio.sleep(0)
    assert got["late"] is got["second"] and len(calls) == 1  # one snapshot in use: the late download shares it
    assert len(cache.in_use) == 1 and cache.in_use[0].users == 2
    finish.set()
    await asyncio.gather(second, *late)
    assert first.cancelled() and cache.in_use == []


@pytest.mark.parametrize("seed", range(10))
async def test_snapshots_stay_within_bounds_under_random_arrivals_departures_and_failures(seed):
    rng = random.Random(seed)
    taken = []

    async def source():
        taken.append(1)
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        if rng.random() < 0.1:
            raise RuntimeError("get_current_state failed")
        return {"call": len(taken)}, [torch.zeros(1)], None

    for max_age, max_snapshots in [(0.0, 1), (0.0, 2), (1e-4, 2), (10.0, 3)]:
        cache = SnapshotCache(source, max_age=max_age, max_snapshots=max_snapshots)

        async def download(cache: SnapshotCache):
            async with cache.use() as snapshot:
                assert len(cache.in_use) <= cache.max_snapshots and snapshot.users >= 1
                assert any(held is snapshot for held in cache.in_use)
                for _ in range(rng.randint(0, 5)):
                    await asyncio.sleep(0)

        downloads = []
        for _ in range(200):
            downloads.append(asyncio.create_task(download(cache)))
            for _ in range(rng.randint(0, 2)):
                await asyncio.sleep(0)
            if rng.random() < 0.3:
                rng.choice(downloads).cancel()
        for outcome in await asyncio.gather(*downloads, return_exceptions=True):
            assert outcome is None or isinstance(outcome, (asyncio.CancelledError, RuntimeError)), outcome
        assert cache.in_use == [] and cache._taking is None
