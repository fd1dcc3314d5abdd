"""Cost of ``averager.step(wait=False)`` in the user's process, next to a blocking call into the averager.

    python benchmarks/benchmark_averager_step.py [--calls 200]

``step(wait=False)`` creates a StepControl (its state in shared memory) and sends it one way to the averager's
process; ``get_group_bits()`` is a blocking round trip through the same pipe, i.e. what every call cost when each
cross-process call waited for its answer. Also timed: reading and setting a control's shared fields.
"""

import argparse
import statistics
import time

import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT


def _percentiles(samples):
    samples = sorted(samples)
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.9)] * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with DHT(start=True) as dht:
        averager = DecentralizedAverager([torch.zeros(1000)], dht, prefix="bench", start=True, min_matchmaking_time=60)
        try:
            averager.get_group_bits()  # warm up the channel
            step_times, controls = [], []
            for _ in range(args.calls):
                start = time.perf_counter()
                controls.append(averager.step(wait=False))
                step_times.append(time.perf_counter() - start)
            field_times = []
            for control in controls:
                start = time.perf_counter()
                control.weight = 2.0
                _ = control.stage, control.triggered
                field_times.append(time.perf_counter() - start)
            for control in controls:
                control.cancel()
            call_times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                averager.get_group_bits()
                call_times.append(time.perf_counter() - start)
        finally:
            averager.shutdown()
    print(f"{'operation':<40}{'median (us)':>14}{'p90 (us)':>12}")
    for name, samples in (
        ("step(wait=False)", step_times),
        ("blocking round trip (get_group_bits)", call_times),
        ("set weight + read stage and trigger", field_times),
    ):
        median, p90 = _percentiles(samples)
        print(f"{name:<40}{median:>14.1f}{p90:>12.1f}")


if __name__ == "__main__":
    main()
