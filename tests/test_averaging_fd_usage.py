"""File descriptors and memory that must not grow with the number of averaged tensors.

With torch's default sharing strategy every shared-memory storage keeps a descriptor open in each process that maps
it: an averager must put its tensors in one shared buffer (not one per tensor), in the user's process and in the
averager's (forked or spawned), and a downloaded state must reach the user's process as one buffer too.
"""

import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm

NUM_TENSORS = 1000
MAX_EXTRA_FDS = 100  # far below NUM_TENSORS: a few for the buffer, pipes and p2p connections


def count_fds(pid: int = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def many_tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=generator) for _ in range(NUM_TENSORS)] + [torch.randn(5).double()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_many_averaged_tensors_cost_a_few_fds_in_both_processes(start_method):
    tensors = [many_tensors(0), many_tensors(1)]
    originals = [[t.clone() for t in peer] for peer in tensors]
    with dht_swarm(2) as dhts:
        before = count_fds()
        with averagers_on(dhts, tensors, target_group_size=2, start_method=start_method) as averagers:
            assert count_fds() - before < MAX_EXTRA_FDS
            for averager in averagers:
                assert count_fds(averager.pid) < MAX_EXTRA_FDS + 50  # its own sockets, pipes and event loop
            with averagers[0].get_tensors() as shared:  # the user's in-place changes reach the averager's process
                shared[0].add_(10)
            originals[0][0] += 10
            controls = [averager.step(wait=False, timeout=30) for averager in averagers]
            for control in controls:
                control.result(timeout=30)
            for index in range(NUM_TENSORS + 1):  # the caller's own tensor objects got the average
                mean = (originals[0][index] + originals[1][index]) / 2
                assert torch.allclose(tensors[0][index], mean, atol=1e-5)
                assert torch.allclose(tensors[1][index], mean, atol=1e-5)
            with averagers[0].get_tensors() as shared:
                assert all(a is b for a, b in zip(shared, tensors[0]))


def test_views_of_a_larger_tensor_keep_sharing_its_storage():
    from hivemind.averaging.shared_buffer import share_in_one_buffer

    base = torch.zeros(10)
    view = base[2:5]
    alone = torch.nn.Parameter(torch.ones(2))
    share_in_one_buffer([view, alone])
    view += 1
    assert base[2:5].tolist() == [1.0, 1.0, 1.0] and base.is_shared()
    assert isinstance(alone, torch.nn.Parameter) and alone.requires_grad and alone.is_shared()


FD_LIMIT_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, "tests")
    from averager_helpers import dht_swarm
    from hivemind.averaging.averager import DecentralizedAverager
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with dht_swarm(1) as (dht,):
        averagers = [
            DecentralizedAverager([torch.zeros(4) for _ in range(600)], dht, prefix=f"fds{i}", start=True)
            for i in range(2)
        ]
        for averager in averagers:
            averager.shutdown()
    print("OK")
    """
)


@pytest.mark.timeout(60)
def test_two_averagers_of_600_tensors_fit_in_512_fds():
    result = subprocess.run(
        [sys.executable, "-c", FD_LIMIT_SCRIPT], capture_output=True, text=True, timeout=50, cwd=os.getcwd()
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


@contextlib.contextmanager
def donor_and_newcomer():
    """A donor of many tensors and a newcomer that can download them: yields (newcomer, the donor's tensors)."""
    donor_tensors = many_tensors(2)
    with dht_swarm(2) as dhts:
        tensors = [donor_tensors, [torch.zeros_like(t) for t in donor_tensors]]
        with averagers_on(dhts, tensors, allow_state_sharing=[True, False]) as (_, newcomer):
            yield newcomer, donor_tensors


@pytest.mark.timeout(60)
def test_downloaded_state_costs_a_few_fds():
    with donor_and_newcomer() as (newcomer, donor_tensors):
        before = count_fds()
        _, downloaded = newcomer.load_state_from_peers(timeout=30)
        assert len(downloaded) == len(donor_tensors)
        assert all(torch.equal(a, b) for a, b in zip(downloaded, donor_tensors))
        assert count_fds() - before < MAX_EXTRA_FDS


@pytest.mark.timeout(60)
def test_downloaded_state_is_freed_once_the_caller_drops_it():
    with donor_and_newcomer() as (newcomer, _):
        _, downloaded = newcomer.load_state_from_peers(timeout=30)
        alive = weakref.ref(downloaded[0])
        del downloaded
        gc.collect()
        assert alive() is None  # nothing in the user's process (e.g. the thread reading answers) still holds it
