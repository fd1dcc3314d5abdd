"""Four peers on this machine average the parameters of their small models, then a newcomer downloads the state.

Each peer has its own DHT node and DecentralizedAverager (each runs in a background process). All four call
``step()`` at about the same time: they find each other under the DHT key ``<prefix>.0b``, form one group and run a
butterfly all-reduce, after which every model holds the mean of the four. A fifth peer then joins and calls
``load_state_from_peers()`` to start from the others' parameters instead of its own random ones.

python examples/averaging.py

Ctrl-C stops it at any point once hivemind is imported: every peer started so far is shut down, then it prints
"interrupted" (exit code 130). During the first seconds, while Python imports hivemind and torch, it ends with a
KeyboardInterrupt traceback instead (nothing has started yet).
"""

import contextlib
import os
import signal
import sys
import time

import torch

import hivemind
from hivemind.averaging import DecentralizedAverager

NUM_PEERS = 4
PREFIX = "example_averaging"


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def describe(model: torch.nn.Module) -> str:
    weight, bias = [round(x, 4) for x in model.weight[0].tolist()], [round(x, 4) for x in model.bias.tolist()]
    return f"weight[0] = {weight}, bias = {bias}"


def main() -> None:
    started = time.perf_counter()
    with contextlib.ExitStack() as peers:  # on the way out (Ctrl-C included), shuts every peer down, newest first
        first_dht = peers.enter_context(hivemind.DHT(start=True))
        initial_peers = [str(addr) for addr in first_dht.get_visible_maddrs()]
        dhts = [first_dht]
        for _ in range(NUM_PEERS - 1):
            dhts.append(peers.enter_context(hivemind.DHT(initial_peers=initial_peers, start=True)))
        models = [make_model(seed) for seed in range(NUM_PEERS)]
        with torch.no_grad():
            expected_weight = torch.stack([model.weight for model in models]).mean(dim=0)

        averagers = []
        for index, (dht, model) in enumerate(zip(dhts, models)):
            print(f"peer {index} before: {describe(model)}")
            averager = DecentralizedAverager(
                [param.detach() for param in model.parameters()],  # averaged in place (moved to shared memory)
                dht,
                start=True,
                prefix=PREFIX,
                target_group_size=NUM_PEERS,  # the group starts as soon as all four are in
                min_matchmaking_time=2.0,
                request_timeout=1.0,
            )
            averagers.append(peers.enter_context(averager))
            averager.state_sharing_priority = float(index)  # newcomers prefer the highest priority
        print(f"started {NUM_PEERS} peers in {time.perf_counter() - started:.1f} s")

        # every peer asks for a round at the same time; wait=False returns a future (a StepControl)
        controls = [
            averager.step(gather=f"peer {index}", wait=False, timeout=30) for index, averager in enumerate(averagers)
        ]
        for index, control in enumerate(controls):
            gathered = control.result()
            print(f"peer {index} averaged in a group of {len(gathered)}: {sorted(gathered.values())}")

        for index, (averager, model) in enumerate(zip(averagers, models)):
            with averager.get_tensors() as tensors:  # the averaged tensors are the model's own parameters
                assert tensors[0].data_ptr() == model.weight.data_ptr()
            print(f"peer {index} after:  {describe(model)}")
        with torch.no_grad():
            error = max((model.weight - expected_weight).abs().max().item() for model in models)
        print(f"every model now holds the mean of the four (largest difference {error:.2e})")

        newcomer_dht = peers.enter_context(hivemind.DHT(initial_peers=initial_peers, start=True))
        newcomer_model = make_model(seed=100)
        newcomer = DecentralizedAverager(
            [param.detach() for param in newcomer_model.parameters()], newcomer_dht, start=True, prefix=PREFIX
        )
        peers.enter_context(newcomer)
        metadata, tensors = newcomer.load_state_from_peers(timeout=30)
        print(f"newcomer downloaded {len(tensors)} tensors with metadata {metadata}")
        with torch.no_grad():
            for param, downloaded in zip(newcomer_model.parameters(), tensors):
                param.copy_(downloaded)
        print(f"newcomer: {describe(newcomer_model)}")
    print(f"done in {time.perf_counter() - started:.1f} s")


def interrupt_once(signal_number, frame) -> None:
    """Ctrl-C: stop what runs; further Ctrl-Cs are ignored, so that they cannot cut the peers' shutdown short."""
    if os.getpid() != SCRIPT_PID:  # a peer's process forked a moment ago, before it set its own handling
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


SCRIPT_PID = os.getpid()

if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupt_once)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # finished: a late Ctrl-C must not break the interpreter's exit
