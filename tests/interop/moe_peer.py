"""One side of the mixture-of-experts interop tests; runs under EITHER implementation (ours or the original 1.1.12).

`moe_peer.py serve <state_path> <hidden> <compression>`: hosts expert `expert.0` (a small MLP) with
  hivemind.moe.Server, saves the module's state_dict to <state_path>, prints one JSON line
  {"event": "ready", "maddrs": [...], ...} and serves until stdin closes.
`moe_peer.py call <result_path> <input_path> <maddr>...`: joins the DHT, finds `expert.0` with get_experts, runs
  forward and backward of the loaded input through it, saves {"output", "grad"} to <result_path>, finds it again
  by beam search and prints {"event": "done", "found_by_beam_search": [uids]}.
Only public API that both implementations share is used. Logs go to stderr.
"""

import json
import os
import sys
import time

import torch
import torch.nn as nn

import hivemind
from hivemind.moe import ModuleBackend, Server, get_experts
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.utils.tensor_descr import BatchTensorDescriptor

UID = "expert.0"


def report(event: str, **fields) -> None:
    line = dict(event=event, version=hivemind.__version__, file=os.path.realpath(hivemind.__file__), **fields)
    print(json.dumps(line), flush=True)


def wait_until_serving(dht, uid: str) -> None:
    """Return once ``uid`` answers an info call from another peer (a second DHT node in this process).

    The original's Server now and then starts with a connection handler process that died or never serves; a
    caller then waits forever (remote experts have no timeout). Reporting "ready" only after this call lets the
    harness's start timeout catch such a server and start a fresh one.
    """
    probe = hivemind.DHT(start=True, initial_peers=dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        expert = None
        while expert is None:  # (until the server's declaration is in the DHT)
            (expert,) = get_experts(probe, [uid])
            if expert is None:
                time.sleep(0.2)
        expert.info  # noqa: B018 - an rpc_info call to the server
    finally:
        probe.shutdown()


def serve(state_path: str, hidden: int, compression: int) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.Tanh(), nn.Linear(2 * hidden, hidden))
    torch.save(module.state_dict(), state_path)
    backend = ModuleBackend(
        UID,
        module,
        args_schema=(BatchTensorDescriptor(hidden, compression=compression),),
        outputs_schema=BatchTensorDescriptor(hidden, compression=compression),
        max_batch_size=65536,
    )
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    server = Server(dht, {UID: backend}, update_period=5, start=True)
    try:
        wait_until_serving(dht, UID)
        report("ready", maddrs=[str(maddr) for maddr in dht.get_visible_maddrs()])
        sys.stdin.read()  # until the test closes our stdin
    finally:
        server.shutdown()
        dht.shutdown()


def call(result_path: str, input_path: str, maddrs) -> None:
    dht = hivemind.DHT(start=True, initial_peers=list(maddrs), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        (expert,) = get_experts(dht, [UID])
        if expert is None:
            raise RuntimeError(f"{UID} is not declared in the DHT")
        inputs = torch.load(input_path).requires_grad_(True)
        output = expert(inputs)
        (output * output).sum().backward()
        torch.save(dict(output=output.detach(), grad=inputs.grad), result_path)
        searcher = MoEBeamSearcher(dht, "expert.", (4,))  # the same expert, found through its prefix entries
        found = [remote.uid for remote in searcher.find_best_experts([[0.0, 1.0, 2.0, 3.0]], 2)]
        report("done", found_by_beam_search=found)
    finally:
        dht.shutdown()


if __name__ == "__main__":
    # one intra-op thread, as the test's own reference computation: a failure seen once on a loaded machine had
    # exactly the second half of a batch's rows off by up to 5e-5, the shape of a batch split between two threads
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    if mode == "serve":
        serve(args[0], int(args[1]), int(args[2]))
    elif mode == "call":
        call(args[0], args[1], args[2:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stderr.flush()
    os._exit(0)
