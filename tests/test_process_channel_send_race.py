"""A call whose send fails because the other process just ended, while the reader thread fails the pending calls
(it saw the pipe close at the same moment), gets one ChannelClosedError: call() itself raised InvalidStateError
('FINISHED') when the reader had failed the call's future first (the killed-DHT message test, ~1 run in 50)."""

import concurrent.futures

import pytest

from hivemind.dht.process_channel import CallerEnd, ChannelClosedError


class PipeClosingAsWeSend:
    """A connection whose other end goes away during send: the reader thread fails every pending call first."""

    def __init__(self):
        self.caller = None

    def send(self, message):
        self.caller.fail_pending(EOFError())
        raise BrokenPipeError(32, "Broken pipe")

    def close(self):
        pass


class ClosedJustAfterRegistering(PipeClosingAsWeSend):
    def send(self, message):
        raise AssertionError("a call on a channel known to be closed is not sent")


def test_call_whose_send_breaks_while_the_reader_fails_it_gets_one_error():
    connection = PipeClosingAsWeSend()
    caller = connection.caller = CallerEnd(connection, exitcode=lambda: -9)
    future = caller.call(concurrent.futures.Future(), "get", "key")
    with pytest.raises(ChannelClosedError, match="killed by signal SIGKILL.*create a new DHT"):
        future.result(timeout=0)
    later = caller.call(concurrent.futures.Future(), "get", "key")  # the channel is known to be closed now
    with pytest.raises(ChannelClosedError, match="is not running"):
        later.result(timeout=0)


def test_call_registered_as_the_reader_fails_every_call_gets_one_error():
    connection = ClosedJustAfterRegistering()
    caller = connection.caller = CallerEnd(connection, exitcode=lambda: -9)
    pending = caller._pending

    class FailedOnRegistration(dict):
        """The reader thread runs fail_pending right after call() registered its future."""

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if key != 0:
                caller._pending = pending
                pending.update(self)
                caller.fail_pending(EOFError())

    caller._pending = FailedOnRegistration(pending)
    future = caller.call(concurrent.futures.Future(), "get", "key")
    with pytest.raises(ChannelClosedError, match="killed by signal SIGKILL"):
        future.result(timeout=0)
