"""peer_driver.py plus DecentralizedAverager commands; runs under EITHER implementation (ours or the original 1.1.12).

Started by the harness as `<python> averaging_driver.py` (PeerProcess(..., driver=AVERAGING_DRIVER)); it speaks the
same JSON-lines protocol as peer_driver.py and keeps all of its commands. Tensors travel as hex strings of their
float32 bytes; peer ids as base58 strings.
"""

import asyncio
import os
import sys

import peer_driver  # noqa: E402  (sets up the protocol's file descriptors on import, before hivemind loads)
import torch  # noqa: E402

from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402


def _to_hex(tensor: torch.Tensor) -> str:
    return tensor.detach().to(torch.float32).contiguous().numpy().tobytes().hex()


def _from_hex(data: str, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(bytes.fromhex(data)), dtype=torch.float32).reshape(shape).clone()


class AveragingDriver(peer_driver.Driver):
    def __init__(self):
        super().__init__()
        self.averagers = []

    async def cmd_averager_create(self, dht_handle, tensors, shapes, prefix, **options):
        """Start an averager on DHT `dht_handle` with float32 tensors (hex, shapes); returns its handle."""
        averaged = [_from_hex(data, shape) for data, shape in zip(tensors, shapes)]
        averager = DecentralizedAverager(averaged, self.dhts[dht_handle], start=False, prefix=prefix, **options)
        averager.run_in_background(await_ready=False)  # forked from the main thread, as the DHT is
        await asyncio.get_running_loop().run_in_executor(None, averager.wait_until_ready)
        self.averagers.append(averager)
        return len(self.averagers) - 1

    async def cmd_averager_step(self, handle, gather=None, weight=None, timeout=None, scheduled_delay=None):
        """One round; returns {peer id: gathered object} (the step's exception is reported as an error)."""
        averager = self.averagers[handle]
        scheduled_time = None
        if scheduled_delay is not None:
            scheduled_time = get_dht_time() + scheduled_delay
        control = averager.step(
            gather=gather, weight=weight, timeout=timeout, scheduled_time=scheduled_time, wait=False
        )
        gathered = await asyncio.get_running_loop().run_in_executor(None, control.result)
        return {str(peer_id): value for peer_id, value in gathered.items()}

    async def cmd_averager_tensors(self, handle):
        with self.averagers[handle].get_tensors() as tensors:
            return [_to_hex(tensor) for tensor in tensors]

    async def cmd_averager_set_priority(self, handle, priority):
        self.averagers[handle].state_sharing_priority = priority
        return True

    async def cmd_averager_load_state(self, handle, timeout=None):
        """Returns None or {"metadata": ..., "tensors": [hex, ...], "shapes": [...]}."""
        averager = self.averagers[handle]
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, lambda: averager.load_state_from_peers(timeout=timeout))
        if result is None:
            return None
        metadata, tensors = result
        return {
            "metadata": metadata,
            "tensors": [_to_hex(tensor) for tensor in tensors],
            "shapes": [list(tensor.shape) for tensor in tensors],
        }

    async def shutdown(self):
        loop = asyncio.get_running_loop()
        for averager in self.averagers:
            try:
                await loop.run_in_executor(None, averager.shutdown)
            except Exception as e:
                peer_driver._log_exception("DecentralizedAverager.shutdown", e)
        await super().shutdown()


if __name__ == "__main__":
    peer_driver.Driver = AveragingDriver  # main() builds the driver by this name
    asyncio.run(peer_driver.main())
    sys.stderr.flush()
    os._exit(0)
