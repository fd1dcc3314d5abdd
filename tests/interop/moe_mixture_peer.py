"""One side of the mixed-server MoE interop test; runs under EITHER implementation (ours or the original).

`moe_mixture_peer.py serve <uid> <seed> <state_path> <hidden> [--max-batch-size N] [<maddr>...]`: hosts expert <uid>
  (a small MLP seeded with <seed>, max_batch_size N, 65536 if not given) with hivemind.moe.Server, saves its
  state_dict to <state_path>, prints one JSON line {"event": "ready", "maddrs": [...], ...} and serves until stdin
  closes.
`moe_mixture_peer.py mix <result_path> <input_path> <proj_path> <n_experts> <maddr>...`: joins the DHT, waits until
  beam search over prefix "expert." finds <n_experts> experts, then runs a RemoteMixtureOfExperts (grid
  (<n_experts>,), k_best=<n_experts>, gating weights loaded from <proj_path>) forward and backward on the loaded
  input, saves {"output", "grad"} to <result_path> and prints {"event": "done", "found": [uids]}.
Only public API that both implementations share is used. Logs go to stderr.
"""

import json
import os
import sys
import time

import torch
import torch.nn as nn
from moe_peer import wait_until_serving  # (this script's folder is on sys.path)

import hivemind
from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts, Server
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.utils.tensor_descr import BatchTensorDescriptor


def report(event: str, **fields) -> None:
    line = dict(event=event, version=hivemind.__version__, file=os.path.realpath(hivemind.__file__), **fields)
    print(json.dumps(line), flush=True)


def expert_module(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.Tanh(), nn.Linear(2 * hidden, hidden))


def serve(uid: str, seed: int, state_path: str, hidden: int, maddrs, max_batch_size: int = 65536) -> None:
    torch.manual_seed(seed)
    module = expert_module(hidden)
    torch.save(module.state_dict(), state_path)
    schema = BatchTensorDescriptor(hidden)
    backend = ModuleBackend(uid, module, args_schema=(schema,), outputs_schema=schema, max_batch_size=max_batch_size)
    dht = hivemind.DHT(start=True, initial_peers=list(maddrs) or None, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    server = Server(dht, {uid: backend}, update_period=5, start=True)
    try:
        wait_until_serving(dht, uid)
        report("ready", maddrs=[str(maddr) for maddr in dht.get_visible_maddrs()])
        sys.stdin.read()  # until the test closes our stdin
    finally:
        server.shutdown()
        dht.shutdown()


def mix(result_path: str, input_path: str, proj_path: str, n_experts: int, maddrs) -> None:
    dht = hivemind.DHT(start=True, initial_peers=list(maddrs), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        searcher = MoEBeamSearcher(dht, "expert.", (n_experts,), negative_caching=False)
        scores = [[float(n_experts - i) for i in range(n_experts)]]
        deadline, found = time.monotonic() + 40, []
        while len(found) < n_experts and time.monotonic() < deadline:
            found = sorted(remote.uid for remote in searcher.find_best_experts(scores, n_experts))
            time.sleep(0.2)
        inputs = torch.load(input_path).requires_grad_(True)
        moe = RemoteMixtureOfExperts(
            dht=dht, uid_prefix="expert.", grid_size=(n_experts,), in_features=inputs.shape[-1], k_best=n_experts,
            forward_timeout=60, backward_timeout=60, timeout_after_k_min=30,
        )  # fmt: skip
        moe.proj.load_state_dict(torch.load(proj_path))
        output = moe(inputs)
        (output * output).sum().backward()
        torch.save(dict(output=output.detach(), grad=inputs.grad), result_path)
        report("done", found=found)
    finally:
        dht.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "serve":
        if args[4:5] == ["--max-batch-size"]:
            serve(args[0], int(args[1]), args[2], int(args[3]), args[6:], max_batch_size=int(args[5]))
        else:
            serve(args[0], int(args[1]), args[2], int(args[3]), args[4:])
    elif mode == "mix":
        mix(args[0], args[1], args[2], int(args[3]), args[4:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stderr.flush()
    os._exit(0)
