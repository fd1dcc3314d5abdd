"""peer_driver.py plus TrainingStateAverager commands; runs under EITHER implementation (ours or the original 1.1.12).

A TrainingStateAverager over a Linear(3, 2) with Adam, that averages some optimizer statistics and extra tensors too.
Every tensor it averages is filled with one number chosen by the test, so the average of a round is easy to check.
"""

import asyncio
import os
import sys

import peer_driver  # noqa: E402  (sets up the protocol's file descriptors on import, before hivemind loads)
import torch  # noqa: E402

from hivemind.optim.state_averager import TrainingStateAverager  # noqa: E402


class StateAveragerDriver(peer_driver.Driver):
    def __init__(self):
        super().__init__()
        self.averagers = []

    async def cmd_state_averager_create(self, dht_handle, prefix, value, statistics, num_extras, **options):
        """Parameters, the `statistics` entries of Adam's state and `num_extras` extra tensors, all filled with
        `value`; returns the averager's handle."""
        model = torch.nn.Linear(3, 2)
        extras = [torch.zeros(4 + index) for index in range(num_extras)]
        averager = TrainingStateAverager(
            dht=self.dhts[dht_handle], optimizer=lambda params: torch.optim.Adam(params), params=model.parameters(),
            prefix=prefix, start=True, average_opt_statistics=tuple(statistics), extra_tensors=extras, **options,
        )  # fmt: skip
        self.averagers.append((averager, tuple(statistics), extras))
        with torch.no_grad():
            for tensor in self._averaged(len(self.averagers) - 1):
                tensor.fill_(value)
        return len(self.averagers) - 1

    def _averaged(self, handle):
        """The live tensors the averager averages, grouped by kind: parameters, statistics, extra tensors."""
        averager, names, extras = self.averagers[handle]
        params = [param for group in averager.optimizer.param_groups for param in group["params"]]
        statistics = [averager.optimizer.state[param][name] for name in names for param in params]
        return [*params, *statistics, *extras]

    async def cmd_state_averager_set_epoch(self, handle, epoch):
        """Put the averager in ``epoch`` (the epoch its next round gathers)."""
        self.averagers[handle][0].local_epoch = epoch

    async def cmd_state_averager_average(self, handle, timeout):
        """One averaging round; returns the set of values of each averaged tensor after it."""
        averager = self.averagers[handle][0]

        def run():
            averager.step(averaging_round=True, averaging_opts=dict(timeout=timeout))
            return [sorted(set(tensor.flatten().tolist())) for tensor in self._averaged(handle)]

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def shutdown(self):
        loop = asyncio.get_running_loop()
        for averager, _, _ in self.averagers:
            try:
                await loop.run_in_executor(None, averager.shutdown)
            except Exception as e:
                peer_driver._log_exception("TrainingStateAverager.shutdown", e)
        await super().shutdown()


if __name__ == "__main__":
    peer_driver.Driver = StateAveragerDriver  # main() builds the driver by this name
    asyncio.run(peer_driver.main())
    sys.stderr.flush()
    os._exit(0)
