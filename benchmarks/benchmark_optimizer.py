"""
Collaborative training with hivemind.Optimizer: several peers (one in client mode) train a small MLP on
scikit-learn's bundled digits (8x8 images, 10 classes) and the script reports seconds per epoch, test accuracy per
epoch next to local training with the same global batch, and each peer's resident memory (with its children).

    python benchmarks/benchmark_optimizer.py --peers 4 --target_batch_size 256 --epochs 5
    python benchmarks/compare.py benchmarks/benchmark_optimizer.py --epochs 5   # against the original

Only the public API is used (hivemind.DHT, hivemind.Optimizer), so the same script runs on the original library.
"""

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np
import torch


def load_data(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return features[train], labels[train], features[test], labels[test]


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def accuracy(model, features, labels) -> float:
    with torch.no_grad():
        return (model(features).argmax(-1) == labels).float().mean().item()


def tree_rss_mib() -> float:
    try:
        import psutil
    except ImportError:
        return float("nan")
    process = psutil.Process()
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_peer(index, args, data, maddr_queue, start_barrier, stop_barrier, results):
    import hivemind

    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = data
    client_mode = index == args.peers - 1 and args.peers > 1 and not args.no_client
    initial_peers = None if index == 0 else maddr_queue.get()
    dht = hivemind.DHT(
        initial_peers=initial_peers, client_mode=client_mode, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
    )
    if index == 0:
        maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
        for _ in range(args.peers - 1):
            maddr_queue.put(maddrs)
    model = make_model(args.hidden, args.seed)
    opt = hivemind.Optimizer(
        dht=dht,
        run_id="benchmark_optimizer",
        target_batch_size=args.target_batch_size,
        batch_size_per_step=args.batch_size,
        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
        params=model.parameters(),
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        verbose=False,
    )
    generator = torch.Generator().manual_seed(args.seed + 1 + index)
    start_barrier.wait()
    started = time.perf_counter()
    epoch_times, accuracies, rss, epochs = [], [], [], []
    epoch = opt.local_epoch
    while opt.local_epoch < args.epochs:
        batch = torch.randint(0, len(train_y), (args.batch_size,), generator=generator)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        opt.step()
        if opt.local_epoch != epoch:
            epoch = opt.local_epoch
            epochs.append(epoch)
            epoch_times.append(time.perf_counter() - started)
            accuracies.append(accuracy(model, test_x, test_y))
            rss.append(tree_rss_mib())
    results.put(dict(index=index, epochs=epochs, epoch_times=epoch_times, accuracy=accuracies, rss=rss))
    stop_barrier.wait()
    opt.shutdown()
    dht.shutdown()


def local_training(args, data):
    """The same model trained alone with one optimizer step per global batch (the collaborative epoch)."""
    train_x, train_y, test_x, test_y = data
    model = make_model(args.hidden, args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    accuracies = []
    for _ in range(args.epochs):
        batch = torch.randint(0, len(train_y), (args.target_batch_size,), generator=generator)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        opt.step()
        accuracies.append(accuracy(model, test_x, test_y))
    return accuracies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4, help="peers, the last one in client mode")
    parser.add_argument("--no_client", action="store_true", help="no client-mode peer")
    parser.add_argument("--target_batch_size", type=int, default=256, help="samples per epoch, whole swarm")
    parser.add_argument("--batch_size", type=int, default=32, help="samples per local step")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--matchmaking_time", type=float, default=5.0, help="seconds")
    parser.add_argument("--averaging_timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    args = parser.parse_args()

    data = load_data(args.seed)
    context = mp.get_context("fork")
    maddr_queue, results = context.Queue(), context.Queue()
    start_barrier, stop_barrier = context.Barrier(args.peers), context.Barrier(args.peers)
    processes = [
        context.Process(target=run_peer, args=(i, args, data, maddr_queue, start_barrier, stop_barrier, results))
        for i in range(args.peers)
    ]
    for process in processes:
        process.start()
    reports = sorted((results.get(timeout=args.timeout) for _ in processes), key=lambda report: report["index"])
    for process in processes:
        process.join(60)
        if process.is_alive():
            process.kill()
    local = local_training(args, data)

    print(
        f"peers={args.peers} (client-mode: {0 if args.no_client or args.peers == 1 else 1}) "
        f"target_batch_size={args.target_batch_size} batch_size={args.batch_size} epochs={args.epochs} "
        f"matchmaking_time={args.matchmaking_time} averaging_timeout={args.averaging_timeout}"
    )
    first = reports[0]
    print("epoch  seconds  accuracy  local_accuracy")
    for epoch, seconds, acc in zip(first["epochs"], first["epoch_times"], first["accuracy"]):
        print(f"{epoch:5d}  {seconds:7.2f}  {acc:8.3f}  {local[epoch - 1]:14.3f}")
    epochs, times = first["epochs"], first["epoch_times"]
    per_epoch = (times[-1] - times[0]) / (epochs[-1] - epochs[0]) if len(times) > 1 else float("nan")
    print(f"seconds per epoch (epochs {epochs[0] + 1 if epochs else 0}..{args.epochs}): {per_epoch:.2f}")
    peak_rss = [max(report["rss"]) if report["rss"] else float("nan") for report in reports]
    print("peak RSS per peer with its child processes (MiB): " + " ".join(f"{value:.0f}" for value in peak_rss))
    if args.json:
        figures = dict(seconds_per_epoch=per_epoch, final_accuracy=first["accuracy"][-1] if times else None,
                       local_final_accuracy=local[-1], peak_rss_mib=max(peak_rss))  # fmt: skip
        print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    _ = np  # numpy is what scikit-learn returns; imported here so a missing install fails early
    main()
