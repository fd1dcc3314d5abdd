"""hivemind.Optimizer(averaging_timeout=None): a round has no time limit, but a peer killed while the others count on
it (kill -9, OOM) must not hold their training forever. Once its progress record expires, the round that waited for it
is cancelled and the survivor goes on with local gradients (hivemind 1.1.12 waits forever there)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import hivemind

TRACKER = dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1, metadata_expiration=4.0)
OPTIMIZER = dict(
    run_id="unlimited_dead_peer", target_batch_size=16, batch_size_per_step=4, matchmaking_time=2.0,
    averaging_timeout=None, averager_opts={"request_timeout": 1.0}, tracker_opts=TRACKER, verbose=False,
)  # fmt: skip

PEER_B = textwrap.dedent(
    """
    import sys, time, torch, hivemind
    dht = hivemind.DHT(initial_peers=[sys.argv[1]], start=True)
    model = torch.nn.Linear(4, 1)
    opt = hivemind.Optimizer(dht=dht, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), params=None, **OPTIMIZER)
    while True:
        model(torch.randn(4, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        print(opt.local_epoch, flush=True)
        time.sleep(0.05)
    """
)


@pytest.mark.timeout(150)
def test_a_survivor_goes_on_when_the_only_other_peer_is_killed_mid_run():
    dht = hivemind.DHT(start=True)
    peer_b = subprocess.Popen(
        [sys.executable, "-c", f"OPTIMIZER = {OPTIMIZER!r}\n" + PEER_B, str(dht.get_visible_maddrs()[0])],
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # its DHT, averagers and daemons die with it
    )
    model = torch.nn.Linear(4, 1)
    opt = hivemind.Optimizer(dht=dht, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), params=None, **OPTIMIZER)
    stop, errors, averaged_with_two = threading.Event(), [], threading.Event()

    def train():
        try:
            while not stop.is_set():
                model(torch.randn(4, 4)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                if len(opt._last_round_peers or ()) == 2:
                    averaged_with_two.set()
                time.sleep(0.05)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=train, daemon=True)
    try:
        thread.start()
        assert averaged_with_two.wait(60), f"the two peers never averaged together ({errors})"
        os.killpg(peer_b.pid, signal.SIGKILL)
        peer_b.wait(10)
        epoch_at_kill, killed_at = opt.local_epoch, time.monotonic()
        # B's record lives 4 s, the watch looks every 5 s: A must be training alone well within a minute
        while opt.local_epoch < epoch_at_kill + 3 and time.monotonic() - killed_at < 60:
            assert thread.is_alive(), errors
            time.sleep(0.1)
        assert opt.local_epoch >= epoch_at_kill + 3, (
            f"the survivor is stuck at epoch {opt.local_epoch} (epoch {epoch_at_kill} when its peer was killed)"
        )
        assert not errors, errors
    finally:
        stop.set()
        if peer_b.poll() is None:
            os.killpg(peer_b.pid, signal.SIGKILL)
            peer_b.wait()
        opt.shutdown()
        thread.join(30)
        dht.shutdown()
    assert not thread.is_alive()
    # the watches of the rounds end with them (or with the optimizer)
    watches = lambda: [t for t in threading.enumerate() if "watch of a round" in t.name]  # noqa: E731
    deadline = time.monotonic() + 15
    while watches() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not watches()
