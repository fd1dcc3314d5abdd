"""A first SIGTERM to a serving child process (DHT, averager, connection handler) starts its clean-up; if the clean-up
hangs, the process still ends once its grace (shutdown_timeout) has passed, so terminate() and a service manager's stop
are not ignored. The grace timer used to fail in its thread (signal.signal outside the main thread), so such a child
never ended; and with shutdown_timeout=None (DecentralizedAverager and DHT accept it: the user's shutdown() then waits
as long as it takes) the timer waited forever; it now uses a default grace."""

import signal

import pytest
from signals_helpers import SessionProcess

CLEAN_UP_HANGS = """
import asyncio
from hivemind.utils.graceful_sigterm import GracefulSigterm

async def main():
    stop = asyncio.Event()
    GracefulSigterm(asyncio.get_running_loop(), stop, grace=GRACE).install().serving()
    print("serving", flush=True)
    await stop.wait()
    print("cleaning up", flush=True)
    await asyncio.Event().wait()  # a clean-up step that never ends

asyncio.run(main())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("grace", ["2.0", "None"])
def test_a_sigterm_ends_a_child_whose_clean_up_hangs_after_its_grace(grace):
    child = SessionProcess(CLEAN_UP_HANGS.replace("GRACE", grace))
    try:
        child.wait_for("serving", timeout=30)
        child.signal_group(signal.SIGTERM)
        child.wait_for("cleaning up", timeout=10)
        assert child.finish(timeout=30) == -signal.SIGTERM, child.output()
    finally:
        child.close()
