"""Torch-free helpers: what a DHT process has imported after mixture, beam search, server and optimizer calls.

``run_scenario(start_method)`` runs in a fresh interpreter (see tests/test_moe_dht_process_lean.py): it starts the
DHTs before anything imports torch (so that a forked DHT process does not inherit it), then uses them the way a
mixture client, an expert server and a training run do, and returns what each DHT process had imported before and
after. This module must not import torch: the DHT processes import it to run :func:`dht_process_state`.
"""

import json
import os
import sys
import time


async def dht_process_state(_dht, _node) -> dict:
    """Runs inside the DHT process: whether it imported torch, and its resident memory (MiB)."""
    with open(f"/proc/{os.getpid()}/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    rss_mib = round(rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    heavy = sorted(name for name in sys.modules if name.startswith(("hivemind.moe", "hivemind.optim", "hivemind.av")))
    return {"torch": "torch" in sys.modules, "rss_mib": rss_mib, "modules": heavy}


def run_scenario(start_method: str) -> dict:
    from hivemind.dht import DHT

    server_dht = DHT(start=True, start_method=start_method)
    client_dht = DHT(initial_peers=server_dht.get_visible_maddrs(), start=True, start_method=start_method)
    report = {"user_torch_at_start": "torch" in sys.modules}
    report["before"] = {"server": server_dht.run_coroutine(dht_process_state)}
    report["before"]["client"] = client_dht.run_coroutine(dht_process_state)

    import torch
    import torch.nn as nn

    from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts, Server
    from hivemind.moe.client.beam_search import MoEBeamSearcher
    from hivemind.moe.server.dht_handler import get_experts
    from hivemind.optim.progress_tracker import ProgressTracker
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    uids = ["ffn.0.0", "ffn.1.1"]
    backends = {
        uid: ModuleBackend(uid, nn.Linear(4, 4), args_schema=(BatchTensorDescriptor(4),), max_batch_size=8)
        for uid in uids
    }
    server = Server(server_dht, backends, start=True)  # connection handlers and declarations use the DHT process
    try:
        deadline = time.monotonic() + 60
        while None in get_experts(client_dht, uids):
            assert time.monotonic() < deadline, "the server did not announce its experts"
            time.sleep(0.1)
        mixture = RemoteMixtureOfExperts(in_features=4, grid_size=(2, 2), dht=client_dht, uid_prefix="ffn.", k_best=2)
        with torch.no_grad():
            outputs = mixture(torch.randn(3, 4))
        report["mixture_outputs"] = list(outputs.shape)
        searcher = MoEBeamSearcher(client_dht, "ffn.", (2, 2))
        report["initial_beam"] = len(searcher.get_initial_beam([1.0, 0.0], beam_size=2))
        report["successors"] = len(searcher.get_active_successors(["ffn.0."])["ffn.0."])
        report["best"] = [expert.uid for expert in searcher.find_best_experts([[1.0, 0.0], [1.0, 0.0]], beam_size=2)]
        empty = RemoteMixtureOfExperts(in_features=4, grid_size=(2,), dht=client_dht, uid_prefix="none.", k_best=1)
        try:  # no experts: the error counts this DHT's peers in the DHT process
            empty(torch.randn(1, 4))
        except RuntimeError as e:
            report["no_experts_error"] = str(e)[:80]
        tracker = ProgressTracker(client_dht, prefix="probe_run", target_batch_size=8, start=True)
        tracker.report_local_progress(0, 4)
        tracker.shutdown()
        report["after"] = {"server": server_dht.run_coroutine(dht_process_state)}
        report["after"]["client"] = client_dht.run_coroutine(dht_process_state)
    finally:
        server.shutdown()
        client_dht.shutdown()
    return report


if __name__ == "__main__":
    print(json.dumps(run_scenario(sys.argv[1])))
