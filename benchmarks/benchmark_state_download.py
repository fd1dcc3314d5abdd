"""State download from one donor: throughput, and the donor's memory while it serves one or several newcomers.

    python benchmarks/benchmark_state_download.py --num_tensors 4 --tensor_size 8000000 --downloaders 1
    python benchmarks/benchmark_state_download.py --num_tensors 4 --tensor_size 8000000 --downloaders 4

The donor (a DHT and a DecentralizedAverager sharing its state) runs in a separate Python process, so that its
memory is not mixed with the newcomers'. ``--downloaders`` newcomers (each with its own DHT and averager, in this
process) call ``load_state_from_peers`` at the same moment. While they download, a thread samples every 20 ms the
resident memory (RSS) and proportional set size (PSS: shared pages split between the processes that map them, so
the PSS of several processes adds up without counting shared memory twice) of the donor's user process and of its
averager process. Printed: the time and MiB/s of each download, whether every downloaded state is exact, the
donor's peak RSS / PSS above what they were before the downloads, what they are 1 s after the downloads ended, and
how many times the donor's ``get_current_state`` ran.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List

import psutil
import torch

import hivemind
from hivemind.averaging import DecentralizedAverager

MIB = 2**20
PREFIX = "benchmark_state_download"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_tensors", type=int, default=4)
    parser.add_argument("--tensor_size", type=int, default=8_000_000, help="float32 elements per tensor")
    parser.add_argument("--downloaders", type=int, default=1, help="newcomers downloading at the same time")
    parser.add_argument("--start_method", default=None, help="averager processes' start method (fork or spawn)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for the downloads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--role", default="main", choices=["main", "donor"], help=argparse.SUPPRESS)
    return parser.parse_args()


def donor_tensors(args: argparse.Namespace) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    return [torch.randn(args.tensor_size, generator=generator) for _ in range(args.num_tensors)]


def run_donor(args: argparse.Namespace) -> None:
    """The donor's user process: start, say where to reach it, serve until stdin closes, report the call count."""
    dht = hivemind.DHT(start=True)
    averager = DecentralizedAverager(
        donor_tensors(args), dht, start=True, prefix=PREFIX, start_method=args.start_method, declare_state_period=5
    )
    state_calls, get_current_state = [0], averager.get_current_state

    def counting_get_current_state():  # set after the start: the averager's process needs no copy of it
        state_calls[0] += 1
        return get_current_state()

    averager.get_current_state = counting_get_current_state
    maddrs = [str(addr) for addr in dht.get_visible_maddrs()]
    print(json.dumps(dict(maddrs=maddrs, averager_pid=averager.pid, pid=os.getpid())), flush=True)
    sys.stdin.read()  # until the main process closes our stdin
    print(json.dumps(dict(state_calls=state_calls[0])), flush=True)
    averager.shutdown()
    dht.shutdown()


def _memory(pid: int) -> Dict[str, int]:
    """RSS and PSS of one process in bytes (PSS from /proc/<pid>/smaps_rollup)."""
    figures = dict(rss=psutil.Process(pid).memory_info().rss, pss=0)
    with open(f"/proc/{pid}/smaps_rollup") as file:
        for line in file:
            if line.startswith("Pss:"):
                figures["pss"] = int(line.split()[1]) * 1024
    return figures


class MemorySampler(threading.Thread):
    """Samples the memory of some processes every ``interval`` seconds; keeps each figure's peak."""

    def __init__(self, pids: Dict[str, int], interval: float = 0.02):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peaks: Dict[str, int] = {}
        self.stop = threading.Event()

    def sample(self) -> Dict[str, int]:
        figures, total_pss = {}, 0
        for name, pid in self.pids.items():
            try:
                memory = _memory(pid)
            except (psutil.Error, OSError):
                continue
            figures[f"{name} rss"], figures[f"{name} pss"] = memory["rss"], memory["pss"]
            total_pss += memory["pss"]
        figures["total pss"] = total_pss
        return figures

    def run(self) -> None:
        while not self.stop.is_set():
            for key, value in self.sample().items():
                self.peaks[key] = max(self.peaks.get(key, 0), value)
            self.stop.wait(self.interval)


def wait_for_donor(dht: hivemind.DHT, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = dht.get(f"{PREFIX}.all_averagers", latest=True)
        if entry is not None and any(isinstance(item.value, float) for item in entry.value.values()):
            return
        time.sleep(0.2)
    raise TimeoutError("the donor never declared that it shares its state")


def main() -> None:
    args = parse_args()
    if args.role == "donor":
        return run_donor(args)
    mebibytes = args.num_tensors * args.tensor_size * 4 / MIB
    print(f"state {args.num_tensors} x {args.tensor_size} float32 ({mebibytes:.1f} MiB), {args.downloaders} newcomers")
    donor = subprocess.Popen(
        [sys.executable, __file__, "--role", "donor", *sys.argv[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    dhts, newcomers = [], []
    try:
        info = json.loads(donor.stdout.readline())
        dhts = [hivemind.DHT(initial_peers=info["maddrs"], start=True) for _ in range(args.downloaders)]
        newcomers = [
            DecentralizedAverager(
                [torch.zeros(args.tensor_size) for _ in range(args.num_tensors)],
                dht,
                start=True,
                prefix=PREFIX,
                allow_state_sharing=False,
                start_method=args.start_method,
            )
            for dht in dhts
        ]
        wait_for_donor(dhts[0])
        sampler = MemorySampler({"donor user": info["pid"], "donor averager": info["averager_pid"]})
        before = sampler.sample()
        sampler.start()
        started = time.perf_counter()
        futures = [newcomer.load_state_from_peers(wait=False, timeout=args.timeout) for newcomer in newcomers]
        results, elapsed = [], []
        for future in futures:
            results.append(future.result())
            elapsed.append(time.perf_counter() - started)
        sampler.stop.set()
        sampler.join()
        time.sleep(1.0)  # what the donor keeps once every download ended
        after = sampler.sample()
        expected = donor_tensors(args)
        exact = sum(
            result is not None and all(torch.equal(got, want) for got, want in zip(result[1], expected))
            for result in results
        )
        for index, seconds in enumerate(elapsed):
            print(f"newcomer {index}: done after {seconds:.2f} s ({mebibytes / seconds:.1f} MiB/s)")
        print(f"exact states: {exact}/{len(results)}")
        print(f"all downloads: {args.downloaders * mebibytes:.1f} MiB in {max(elapsed):.2f} s")
        for key in ("donor user rss", "donor user pss", "donor averager rss", "donor averager pss", "total pss"):
            start, peak = before.get(key, 0) / MIB, sampler.peaks.get(key, 0) / MIB
            name = key.replace("donor ", "")
            end = after.get(key, 0) / MIB
            print(
                f"donor {name}: {start:.0f} MiB before, peak {peak:.0f} MiB (+{peak - start:.0f}), after {end:.0f} MiB"
            )
    finally:
        for newcomer in newcomers:
            newcomer.shutdown()
        for dht in dhts:
            dht.shutdown()
        out, _ = donor.communicate(timeout=60)
        for line in out.splitlines():
            if "state_calls" in line:
                print(f"donor get_current_state calls: {json.loads(line)['state_calls']}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
