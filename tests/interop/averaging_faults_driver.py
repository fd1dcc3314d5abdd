"""averaging_driver.py plus options that the mixed-group fault tests need; runs under EITHER implementation.

Adds: averagers with a compression per member (by class name, or a list of names for a per-tensor choice), with
state compression, auxiliary mode and any other constructor option; steps that wait for a trigger, so that a test
can see a group formed (stage AWAITING_TRIGGER) before it kills a member and lets the others exchange tensors.
"""

import asyncio
import os
import sys

import averaging_driver  # noqa: E402  (imports peer_driver, which sets up the protocol's file descriptors first)
import peer_driver  # noqa: E402

from hivemind import compression as codecs  # noqa: E402
from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402


def _codec(spec):
    """A CompressionBase from a class name, or PerTensorCompression from a list of names (one per tensor)."""
    if spec is None:
        return codecs.NoCompression()
    if isinstance(spec, list):
        return codecs.PerTensorCompression([_codec(name) for name in spec])
    return getattr(codecs, spec)()


class ReviewAveragingDriver(averaging_driver.AveragingDriver):
    def __init__(self):
        super().__init__()
        self.controls = []

    async def cmd_averager_create_with(
        self, dht_handle, tensors, shapes, prefix, compression=None, state_compression=None, **options
    ):
        """As averager_create, with `compression` / `state_compression` given as codec names (see _codec)."""
        averaged = [averaging_driver._from_hex(data, shape) for data, shape in zip(tensors, shapes)]
        averager = DecentralizedAverager(
            averaged,
            self.dhts[dht_handle],
            start=False,
            prefix=prefix,
            compression=_codec(compression),
            state_compression=_codec(state_compression),
            **options,
        )
        averager.run_in_background(await_ready=False)
        await asyncio.get_running_loop().run_in_executor(None, averager.wait_until_ready)
        self.averagers.append(averager)
        return len(self.averagers) - 1

    async def cmd_averager_begin(self, handle, gather=None, weight=None, timeout=None, scheduled_delay=None):
        """Starts a step that forms a group and then waits for averager_trigger; returns the step's handle."""
        scheduled_time = None if scheduled_delay is None else get_dht_time() + scheduled_delay
        control = self.averagers[handle].step(
            gather=gather,
            weight=weight,
            timeout=timeout,
            scheduled_time=scheduled_time,
            wait=False,
            require_trigger=True,
        )
        self.controls.append(control)
        return len(self.controls) - 1

    async def cmd_averager_wait_stage(self, control, stage, wait_s=30.0):
        """Waits until the step reaches `stage` (an AveragingStage name) or ends; returns the stage it is in."""
        step, loop = self.controls[control], asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while step.stage.name != stage and not step.done() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return step.stage.name

    async def cmd_averager_trigger(self, control):
        self.controls[control].allow_allreduce()
        return True

    async def cmd_averager_finish(self, control):
        """The step's result ({peer id: gathered}); its exception is reported as an error."""
        gathered = await asyncio.get_running_loop().run_in_executor(None, self.controls[control].result)
        return {str(peer_id): value for peer_id, value in gathered.items()}


if __name__ == "__main__":
    peer_driver.Driver = ReviewAveragingDriver  # main() builds the driver by this name
    asyncio.run(peer_driver.main())
    sys.stderr.flush()
    os._exit(0)
