"""optimizer_driver.py plus what the late-joiner test needs; runs under EITHER implementation.

Adds optimizer_load_state (hivemind.Optimizer.load_state_from_peers, in a worker thread), optimizer_share_state
(turns state sharing on or off) and optimizer_params (the model's parameters and the local epoch), so a peer that
joins a trained swarm can be compared with it.
"""

import asyncio
import os
import sys

import optimizer_driver  # noqa: E402  (imports peer_driver, which sets up the protocol's file descriptors first)
import peer_driver  # noqa: E402


class LateJoinerOptimizerDriver(optimizer_driver.OptimizerDriver):
    async def cmd_optimizer_load_state(self, handle):
        _, opt = self.optimizers[handle]
        await asyncio.get_running_loop().run_in_executor(None, opt.load_state_from_peers)
        return opt.local_epoch

    async def cmd_optimizer_share_state(self, handle, allow):
        """Whether this peer serves its state to newcomers (state_averager.allow_state_sharing)."""
        self.optimizers[handle][1].state_averager.allow_state_sharing = allow
        return True

    async def cmd_optimizer_report(self, handle, samples):
        """Reports `samples` accumulated in the current epoch (the original publishes its record only then)."""
        opt = self.optimizers[handle][1]
        opt.tracker.report_local_progress(opt.local_epoch, samples)
        return True

    async def cmd_optimizer_params(self, handle):
        model, opt = self.optimizers[handle]
        return {
            "epoch": opt.local_epoch,
            "weight": optimizer_driver._to_hex(model.weight),
            "bias": optimizer_driver._to_hex(model.bias),
        }


if __name__ == "__main__":
    peer_driver.Driver = LateJoinerOptimizerDriver  # main() builds the driver by this name
    asyncio.run(peer_driver.main())
    sys.stderr.flush()
    os._exit(0)
