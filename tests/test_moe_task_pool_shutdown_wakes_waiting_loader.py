"""A thread waiting in ``load_batch_to_runtime()`` (no timeout, as a runtime of its own may) gets an error as soon as
the pool is shut down, also while a child forked from the pool's process lives (e.g. a connection handler process of
the server): that child's copy of the pool's pipe hid the shutdown, and the thread waited forever."""

import multiprocessing as mp
import threading
import time

import pytest

from hivemind.moe.server.task_pool import TaskPool

ANSWER_WITHIN = 5  # seconds; it takes milliseconds


@pytest.mark.timeout(30)
def test_waiting_loader_fails_at_shutdown_while_a_forked_child_lives():
    pool = TaskPool(lambda x: x, max_batch_size=4, name="pool", start=True)
    child = mp.get_context("fork").Process(target=time.sleep, args=(30,), daemon=True)
    child.start()  # forked after the pool was made, as the server's handler processes are
    errors = []

    def wait_for_a_batch():
        try:
            pool.load_batch_to_runtime()
        except Exception as e:
            errors.append(e)

    loader = threading.Thread(target=wait_for_a_batch, daemon=True)
    try:
        loader.start()
        time.sleep(0.2)  # (it waits for a batch)
        pool.shutdown()
        loader.join(ANSWER_WITHIN)
        assert not loader.is_alive(), "load_batch_to_runtime() still waits after the pool was shut down"
        assert len(errors) == 1 and "shut down" in str(errors[0]), errors
    finally:
        child.kill()
        child.join()
        pool.shutdown()
