"""
What the trainer and the monitor do before they load torch: parse their shared command-line options and join the
swarm. Loading torch takes seconds, so the scripts start their DHT peer first: the first peer of a run prints the
address the others need right away, and they can start while it is still loading.
"""

import argparse
import signal

import hivemind


def add_swarm_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the trainer and the monitor."""
    parser.add_argument("--run_id", default="stdlib_lm", help="peers with the same run_id train one model")
    parser.add_argument("--initial_peers", nargs="*", default=[], help="addresses printed by a running peer")
    parser.add_argument(
        "--host_maddrs",
        nargs="+",
        default=["/ip4/0.0.0.0/tcp/0"],
        help="where this peer listens (the default accepts connections from other machines)",
    )
    parser.add_argument("--data_bytes", type=int, default=2_000_000, help="bytes of stdlib source to train on")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (same on every peer)")
    add_model_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the model (see model.py): every peer of a run (and the monitor) must pass the same values."""
    parser.add_argument("--hidden_size", type=int, default=128, help="width of the transformer")
    parser.add_argument("--num_layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--num_heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seq_length", type=int, default=64, help="bytes per training sequence")


def stop_on_first_ctrl_c() -> None:
    """Make the first Ctrl-C raise KeyboardInterrupt and ignore the next ones: a second Ctrl-C while the peer leaves
    the run (shutting its optimizer or checkpoint saver down) would otherwise cut that short."""

    def interrupt_once(signal_number, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt_once)


def ignore_ctrl_c() -> None:
    """Once the peer has left and said so: a late Ctrl-C would only interrupt the interpreter's exit (a traceback
    from a finalizer of torch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def join_swarm(args: argparse.Namespace, client_mode: bool = False) -> hivemind.DHT:
    """Start this peer's DHT (``import hivemind`` does not load torch) and print the address others can join."""
    dht = hivemind.DHT(
        initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, client_mode=client_mode, start=True
    )
    try:
        if not client_mode:  # a client-mode peer accepts no connections: it has no address to give
            addresses = " ".join(str(address) for address in dht.get_visible_maddrs())
            print(f"To join this run, start more peers with: --initial_peers {addresses}", flush=True)
    except BaseException:  # e.g. Ctrl-C right now: the caller never gets the DHT to shut it down
        dht.shutdown()
        raise
    return dht
