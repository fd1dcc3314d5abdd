"""A hostile reducer that answers a 64-byte part with a 100 MiB delta is refused before the delta is read:
the sender limits each reply to what a delta of its largest part can take under any codec (before: 256 MiB, so the
averager grew by some 300 MiB before it found the delta's size wrong)."""

import asyncio
import threading

import psutil
import pytest
import torch
from averaging_hostile_peer import delta_message, hostile_setup, run_step

pytestmark = pytest.mark.timeout(60)
DELTA_ELEMENTS = 25 * 2**20  # 100 MiB of float32


async def test_a_delta_far_larger_than_its_part_is_refused_unread():
    oversized = delta_message(torch.zeros(DELTA_ELEMENTS))
    tensor = torch.arange(16, dtype=torch.float32)
    async with hostile_setup([tensor.clone()], part_size_bytes=64) as (hostile, victim):
        hostile.make_delta = lambda message: oversized
        process = psutil.Process(victim.pid)
        before = peak = process.memory_info().rss
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.02):
                peak = max(peak, process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            outcome = await run_step(hostile, victim, timeout=20)
        finally:
            stop.set()
            await asyncio.to_thread(sampler.join)
        assert hostile.parts_received, f"the victim never reached the hostile reducer: {outcome!r}"
        assert peak - before < 50 * 2**20, f"the averager grew by {(peak - before) / 2**20:.0f} MiB"
        with victim.get_tensors() as (averaged,):
            assert torch.equal(averaged, tensor)  # the refused delta changed nothing
