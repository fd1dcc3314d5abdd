"""A call that fails while sending because p2pd went away (as when a SIGTERM reaches p2pd and its clients at once)
raises its error once, and leaves no 'Future exception was never retrieved' behind in the log."""

import asyncio
import gc

import pytest

from hivemind.p2p.p2p_daemon_bindings.persistent import PersistentConnection
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError


class WriterToDeadDaemon:
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        raise ConnectionResetError("p2pd closed the connection")

    def close(self) -> None:
        pass


@pytest.mark.timeout(10)
async def test_request_failing_while_sending_leaves_no_unretrieved_future():
    unhandled = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context["message"]))
    connection = PersistentConnection(asyncio.StreamReader(), WriterToDeadDaemon(), max_msg_size=2**20)
    with pytest.raises(P2PDaemonError, match="Lost the persistent connection to p2pd"):
        await connection.remove_unary_handler("/some/handler")
    gc.collect()
    await asyncio.sleep(0)
    assert unhandled == []
