"""peer_driver.py plus TrainingStateAverager state loading; runs under EITHER implementation (ours or 1.1.12).

A TrainingStateAverager over a Linear(3, 2) with Adam, made with or without optimizer statistics (trained or not),
that serves its state, or loads a donor's into itself.
"""

import asyncio
import os
import sys
import time

import peer_driver  # noqa: E402  (sets up the protocol's file descriptors on import, before hivemind loads)
import torch  # noqa: E402

from hivemind.optim.state_averager import TrainingStateAverager  # noqa: E402


class StateLoadDriver(peer_driver.Driver):
    def __init__(self):
        super().__init__()
        self.averagers = []

    async def cmd_load_averager_create(self, dht_handle, prefix, seed, trained, epoch=0, **options):
        """``trained``: the optimizer made its statistics and took one step (else it has none, as a fresh one)."""
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        averager = TrainingStateAverager(
            dht=self.dhts[dht_handle], optimizer=lambda params: torch.optim.Adam(params, lr=0.1),
            params=model.parameters(), prefix=prefix, start=True, initialize_optimizer=trained, **options,
        )  # fmt: skip
        attempts = []
        if hasattr(averager, "_load_state_from_peers_excluding"):  # (ours): count the downloads asked for
            original = averager._load_state_from_peers_excluding
            averager._load_state_from_peers_excluding = lambda *a, **k: attempts.append(1) or original(*a, **k)
        if trained:
            for param in model.parameters():
                param.grad = torch.ones_like(param)
            await asyncio.get_running_loop().run_in_executor(None, lambda: averager.step(optimizer_step=True))
        averager.local_epoch = epoch
        self.averagers.append((averager, model, attempts))
        return len(self.averagers) - 1

    async def cmd_load_averager_wait_declared(self, handle, wait_s=30.0):
        averager = self.averagers[handle][0]
        deadline = time.monotonic() + wait_s
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, averager.dht.get, f"{averager.prefix}.all_averagers", True) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("no donor declared its state")
            await asyncio.sleep(0.2)
        return True

    async def cmd_load_averager_load(self, handle, load_timeout):
        averager, _, attempts = self.averagers[handle]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: averager.load_state_from_peers(timeout=load_timeout))
        return len(attempts)

    async def cmd_load_averager_state(self, handle):
        averager, model, _ = self.averagers[handle]
        params = averager.optimizer.param_groups[0]["params"]
        statistics = [
            {name: value.flatten().tolist() for name, value in sorted(averager.optimizer.state[param].items())}
            for param in params
            if param in averager.optimizer.state
        ]
        return {
            "epoch": averager.local_epoch,
            "weight": model.weight.detach().flatten().tolist(),
            "bias": model.bias.detach().flatten().tolist(),
            "statistics": statistics,
        }

    async def shutdown(self):
        loop = asyncio.get_running_loop()
        for averager, _, _ in self.averagers:
            try:
                await loop.run_in_executor(None, averager.shutdown)
            except Exception as e:
                peer_driver._log_exception("TrainingStateAverager.shutdown", e)
        await super().shutdown()


if __name__ == "__main__":
    peer_driver.Driver = StateLoadDriver  # main() builds the driver by this name
    asyncio.run(peer_driver.main())
    sys.stderr.flush()
    os._exit(0)
