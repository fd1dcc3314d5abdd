"""peer_driver.py plus hivemind.Optimizer commands; runs under EITHER implementation (ours or the original 1.1.12).

Started by the harness as `<python> optimizer_driver.py` (PeerProcess(..., driver=OPTIMIZER_DRIVER)). The model is a
Linear(8, 1) whose initial weights and training batches come from the test as hex strings of float32 bytes, so both
implementations see the same numbers whatever their torch version.
"""

import asyncio
import os
import sys

import peer_driver  # noqa: E402  (sets up the protocol's file descriptors on import, before hivemind loads)
import torch  # noqa: E402

import hivemind  # noqa: E402


def _to_hex(tensor: torch.Tensor) -> str:
    return tensor.detach().to(torch.float32).contiguous().numpy().tobytes().hex()


def _from_hex(data: str, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(bytes.fromhex(data)), dtype=torch.float32).reshape(shape).clone()


class OptimizerDriver(peer_driver.Driver):
    def __init__(self):
        super().__init__()
        self.optimizers = []

    async def cmd_optimizer_create(self, dht_handle, run_id, weight, bias, lr, inner="sgd", **options):
        """A Linear(8, 1) with the given weights (hex) and hivemind.Optimizer(SGD(lr)) (Adam(lr) if `inner` is
        "adam"); returns its handle."""
        model = torch.nn.Linear(8, 1)
        with torch.no_grad():
            model.weight.copy_(_from_hex(weight, [1, 8]))
            model.bias.copy_(_from_hex(bias, [1]))
        opt = hivemind.Optimizer(
            dht=self.dhts[dht_handle], run_id=run_id, params=model.parameters(),
            optimizer=lambda params: (torch.optim.Adam if inner == "adam" else torch.optim.SGD)(params, lr=lr),
            **options,
        )  # fmt: skip
        # the original publishes its progress record only once progress is reported: do it now, so that peers see
        # each other before training starts
        opt.tracker.report_local_progress(opt.local_epoch, 0)
        self.optimizers.append((model, opt))
        return len(self.optimizers) - 1

    async def cmd_optimizer_wait_for_peers(self, handle, num_peers, timeout=30.0):
        _, opt = self.optimizers[handle]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while opt.tracker.global_progress.num_peers < num_peers:
            if loop.time() > deadline:
                raise TimeoutError(f"saw {opt.tracker.global_progress.num_peers} of {num_peers} peers")
            await asyncio.sleep(0.05)
        return opt.tracker.global_progress.num_peers

    async def cmd_optimizer_progress(self, handle):
        """The swarm's progress as this peer sees it, and this peer's own record."""
        _, opt = self.optimizers[handle]
        progress = opt.tracker.global_progress
        return {
            "epoch": progress.epoch, "samples_accumulated": progress.samples_accumulated,
            "num_peers": progress.num_peers, "local_epoch": opt.local_epoch,
            "local_samples": opt.tracker.local_progress.samples_accumulated,
        }  # fmt: skip

    async def cmd_optimizer_train(self, handle, batches, until_epoch, batch_size):
        """Train until `until_epoch`; in epoch e, every step uses batches[e] = (features hex, targets hex)."""
        model, opt = self.optimizers[handle]
        data = [(_from_hex(x, [batch_size, 8]), _from_hex(y, [batch_size, 1])) for x, y in batches]

        def train():
            steps = 0
            while opt.local_epoch < until_epoch:
                features, targets = data[min(opt.local_epoch, len(data) - 1)]
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(features), targets).backward()
                opt.step(batch_size=batch_size)
                steps += 1
            return steps

        steps = await asyncio.get_running_loop().run_in_executor(None, train)
        return {"epoch": opt.local_epoch, "steps": steps, "weight": _to_hex(model.weight), "bias": _to_hex(model.bias)}

    async def shutdown(self):
        loop = asyncio.get_running_loop()
        for _, opt in self.optimizers:
            try:
                await loop.run_in_executor(None, opt.shutdown)
            except Exception as e:
                peer_driver._log_exception("Optimizer.shutdown", e)
        await super().shutdown()


if __name__ == "__main__":
    peer_driver.Driver = OptimizerDriver  # main() builds the driver by this name
    asyncio.run(peer_driver.main())
    sys.stderr.flush()
    os._exit(0)
