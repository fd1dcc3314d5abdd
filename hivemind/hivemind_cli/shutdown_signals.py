"""How the command-line tools react to SIGINT (Ctrl-C) and SIGTERM: the first one starts a clean shutdown."""

import os
import signal
import threading

from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ShutdownSignals:
    """
    Installed by a tool's main() before it starts anything: SIGINT and SIGTERM log ``Caught signal <n> (<name>),
    shutting down`` and set ``requested`` instead of raising in the middle of whatever runs. The tool checks
    ``requested`` after each start-up step and while it serves, so a signal at any moment (while the DHT starts,
    just as the start-up lines are printed, during the shutdown itself) ends in the same ordered shutdown.

    Child processes forked by the tool (the DHT process, connection handlers) inherit these handlers. There SIGINT is
    ignored (Ctrl-C in a terminal reaches the whole process group: the tool stops its children in order) and SIGTERM
    keeps its default effect, so that ``terminate()`` still ends a child that does not stop when asked.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._owner_pid = os.getpid()

    def install(self) -> "ShutdownSignals":
        for signal_number in SHUTDOWN_SIGNALS:
            signal.signal(signal_number, self._on_signal)
        return self

    def _on_signal(self, signal_number: int, _frame) -> None:
        if os.getpid() != self._owner_pid:  # a forked child that has not set its own handlers (yet)
            if signal_number == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        # the description is the C library's, as the original prints it: "Interrupt", "Terminated"
        description = f"Caught signal {signal_number} ({signal.strsignal(signal_number)})"
        if self.requested.is_set():
            logger.info(f"{description} again, still shutting down")
            return
        logger.info(f"{description}, shutting down")
        self.requested.set()
