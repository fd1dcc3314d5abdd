"""Cost of MPFuture operations across processes: state reads, completion from another process, creation.

    python benchmarks/benchmark_mpfuture.py [--baseline path/to/older/mpfuture.py]

With --baseline, the same operations are timed for another implementation of the module (e.g. the previous one,
from ``git show <commit>:hivemind/utils/mpfuture.py > /tmp/old_mpfuture.py``), in the same run.
"""

import argparse
import importlib.util
import multiprocessing as mp
import time


def _load(path: str):
    spec = importlib.util.spec_from_file_location("mpfuture_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(module_path, futures, state_future, report, repeats):
    module = _load(module_path) if module_path else None
    del module  # the futures were unpickled with their own module already
    future = state_future
    start = time.perf_counter()
    for _ in range(repeats):
        future.done()
    read_us = (time.perf_counter() - start) / repeats * 1e6
    start = time.perf_counter()
    for index, item in enumerate(futures):
        item.set_result(index)
    complete_us = (time.perf_counter() - start) / len(futures) * 1e6
    report.set_result((read_us, complete_us))


def measure(module, module_path, repeats: int, num_futures: int):
    start = time.perf_counter()
    futures = [module.MPFuture() for _ in range(num_futures)]
    create_us = (time.perf_counter() - start) / num_futures * 1e6
    state_future, report = module.MPFuture(), module.MPFuture()
    process = mp.get_context("fork").Process(target=_child, args=(module_path, futures, state_future, report, repeats))
    process.start()
    read_us, complete_us = report.result(timeout=120)
    start = time.perf_counter()
    assert [future.result(timeout=60) for future in futures] == list(range(num_futures))
    drain = time.perf_counter() - start
    process.join()
    return create_us, read_us, complete_us, drain


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="path of another mpfuture.py to compare with")
    parser.add_argument("--repeats", type=int, default=20000, help="state reads timed in the child")
    parser.add_argument("--futures", type=int, default=2000, help="futures created and completed")
    args = parser.parse_args()
    import hivemind.utils.mpfuture as current

    rows = [("current", current, None)]
    if args.baseline:
        rows.append(("baseline", _load(args.baseline), args.baseline))
    print(f"{'impl':<10}{'create (us)':>13}{'done() in child (us)':>22}{'set_result in child (us)':>26}")
    for name, module, path in rows:
        create_us, read_us, complete_us, _ = measure(module, path, args.repeats, args.futures)
        print(f"{name:<10}{create_us:>13.1f}{read_us:>22.2f}{complete_us:>26.1f}")


if __name__ == "__main__":
    main()
