"""Creating and shutting down servers in one process does not accumulate file descriptors or threads.

The garbage collector is paused while the servers cycle: a resource must be released by ``shutdown()`` itself, not
by whenever a reference cycle happens to be collected.
"""

import gc
import os
import threading

import pytest
import torch

from hivemind.moe.server import Server
from hivemind.moe.server.runtime import Runtime
from hivemind.moe.server.task_pool import TaskPool

CYCLES = 4
SLACK = 2  # fds / threads a cycle may leave behind (a lazily started helper, a socket still closing)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def serve_and_shut_down() -> None:
    server = Server.create(
        num_experts=2, expert_cls="ffn", hidden_dim=8, device="cpu", host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
    )
    server.shutdown()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
@pytest.mark.timeout(120)
def test_server_cycles_do_not_accumulate_fds_or_threads():
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        serve_and_shut_down()  # the first cycle may start per-process helpers that stay (task pool hub, listeners)
        fds_after_first, threads_after_first = open_fd_count(), threading.active_count()
        for _ in range(CYCLES - 1):
            serve_and_shut_down()
        fds_after_last, threads_after_last = open_fd_count(), threading.active_count()
    finally:
        if gc_was_enabled:
            gc.enable()
    assert fds_after_last <= fds_after_first + SLACK, (
        f"{CYCLES - 1} more server cycles left {fds_after_last - fds_after_first} more open file descriptors"
    )
    assert threads_after_last <= threads_after_first + SLACK, (
        f"{CYCLES - 1} more server cycles left {threads_after_last - threads_after_first} more threads: "
        f"{[thread.name for thread in threading.enumerate()]}"
    )


def test_task_pool_shutdown_closes_its_pipe_even_if_never_started():
    pool = TaskPool(lambda x: x, max_batch_size=4, name="never_started")
    pool.shutdown()
    pool.shutdown()  # a second call is a no-op
    assert pool.batch_receiver.closed and pool._batch_sender.closed
    assert pool.empty
    with pytest.raises(RuntimeError, match="shut down"):
        pool.load_batch_to_runtime(timeout=0)


@pytest.mark.timeout(30)
def test_task_pool_shutdown_closes_its_pipe_after_serving():
    pool = TaskPool(lambda x: x * 2, max_batch_size=4, name="served", start=True)
    future = pool.submit_task(torch.ones(2, 3))
    batch_index, inputs = pool.load_batch_to_runtime(timeout=10)
    pool.send_outputs_from_runtime(batch_index, pool.process_func(*inputs))
    assert torch.equal(future.result(timeout=10)[0], torch.full((2, 3), 2.0))
    pool.shutdown()
    assert not pool.is_alive()
    assert pool.batch_receiver.closed and pool._batch_sender.closed


def test_runtime_shutdown_closes_its_wake_pipe_even_if_never_run():
    runtime = Runtime({})
    runtime.shutdown()
    runtime.shutdown()
    assert runtime._wake_receiver.closed and runtime._wake_sender.closed
    runtime.run()  # after shutdown: returns at once instead of serving on a closed pipe


@pytest.mark.timeout(30)
def test_runtime_closes_its_wake_pipe_when_it_stops():
    runtime = Runtime({})
    runtime.start()
    assert runtime.ready.wait(10)
    runtime.shutdown(timeout=10)
    assert not runtime.is_alive()
    assert runtime._wake_receiver.closed and runtime._wake_sender.closed
