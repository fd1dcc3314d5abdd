"""A streamed request that ends before all of its tensors, or all the chunks its tensors announced, arrived (its caller
died or gave up mid-stream) is never computed: it is refused, with the reason logged, and the expert goes on serving.
A tensor given more chunks than it announced is refused at once, without waiting for the end of the stream."""

import asyncio
import logging
import math
import threading

import pytest
import torch
from moe_hostile_helpers import (
    HIDDEN,
    UID,
    as_stream,
    attacker,
    chunked,
    drain,
    good_forward,
    hostile_server,
    sleep_forever_after,
)

from hivemind.moe.server.expert_requests import IncompleteStreamError
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2

__all__ = ["attacker", "hostile_server"]  # the fixtures, used by the tests below

ROWS = 64  # 64 x 16 float32 = 4 KiB: four chunks of 1 KiB


@pytest.fixture
def submitted(hostile_server, monkeypatch):
    """Every task that reaches the forward or backward pool of UID."""
    tasks = []
    backend = hostile_server.module_backends[UID]
    for pool in (backend.forward_pool, backend.backward_pool):
        submit = pool.submit_task

        def recording_submit(*tensors, submit=submit):
            tasks.append(tensors)
            return submit(*tensors)

        monkeypatch.setattr(pool, "submit_task", recording_submit)
    return tasks


class LogWatcher(logging.Handler):
    def __init__(self, pattern: str):
        super().__init__(logging.DEBUG)
        self.pattern, self.seen, self.messages, self.levels = pattern, threading.Event(), [], []

    def emit(self, record):
        message = record.getMessage()
        if self.pattern in message:
            self.messages.append(message)
            self.levels.append(record.levelno)
            self.seen.set()


@pytest.fixture
def dropped_streams_log():
    logger = logging.getLogger("hivemind.moe.server.connection_handler")
    watcher = LogWatcher("Dropped a streamed request")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # (after the first, drops are logged at DEBUG for a while)
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


@pytest.mark.timeout(30)
async def test_stream_cut_short_is_refused_naming_the_missing_chunks(attacker, submitted, dropped_streams_log):
    _, stub = attacker
    messages = chunked(torch.randn(ROWS, HIDDEN))
    assert len(messages) == 4 and messages[0].tensors[0].chunks == 4
    with pytest.raises(P2PHandlerError, match="tensor #0 got 3 of the 4 chunks its first chunk announced"):
        await drain(await stub.rpc_forward_stream(as_stream(messages[:3])))
    assert dropped_streams_log.messages, "the reason for dropping the request should be logged"
    assert submitted == [], "an incomplete request reached the pool"
    await good_forward(stub)


@pytest.mark.timeout(30)
async def test_backward_stream_without_its_gradients_is_refused(attacker, submitted):
    _, stub = attacker
    inputs_only = chunked(torch.randn(ROWS, HIDDEN))  # the gradients of the outputs never come
    with pytest.raises(P2PHandlerError, match="expects 2 tensors, got 1 when the stream ended"):
        await drain(await stub.rpc_backward_stream(as_stream(inputs_only)))
    assert submitted == []


class CallerDied(Exception):
    pass


@pytest.mark.timeout(30)
async def test_caller_dying_mid_stream_is_dropped_with_a_logged_reason(attacker, submitted, dropped_streams_log):
    _, stub = attacker
    messages = chunked(torch.randn(ROWS, HIDDEN))

    async def dies_after_two_chunks():
        for message in messages[:2]:
            yield message
        raise CallerDied()  # the caller's stream is aborted: the server sees its input end without end-of-stream

    with pytest.raises(CallerDied):
        await drain(await stub.rpc_forward_stream(dies_after_two_chunks()))
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, dropped_streams_log.seen.wait, 20), "no reason logged for the drop"
    assert "tensor #0 got 2 of the 4 chunks" in dropped_streams_log.messages[0]
    assert submitted == [], "the request of a caller that died mid-stream reached the pool"
    await good_forward(stub)


@pytest.mark.timeout(30)
async def test_chunk_beyond_the_announced_count_is_refused_at_once(attacker, submitted):
    _, stub = attacker
    messages = chunked(torch.randn(ROWS, HIDDEN))
    stalled = asyncio.Event()
    extra = runtime_pb2.ExpertRequest(uid=UID, tensors=[runtime_pb2.Tensor(buffer=b"\x00" * 1024)])
    call = asyncio.create_task(drain(await stub.rpc_forward_stream(sleep_forever_after([*messages, extra], stalled))))
    with pytest.raises(P2PHandlerError, match="tensor #0 got more chunks than the 4 its first chunk announced"):
        await asyncio.wait_for(call, 20)  # without waiting for the stalled stream's end (or its stall timeout)
    assert submitted == []


@pytest.mark.timeout(30)
async def test_complete_stream_of_several_chunks_is_served(attacker):
    _, stub = attacker
    x = torch.randn(ROWS, HIDDEN)
    responses = [response async for response in await stub.rpc_forward_stream(as_stream(chunked(x)))]
    assert responses and all(len(response.tensors) == 1 for response in responses)


def test_dropped_streams_are_logged_at_info_at_most_once_per_interval(
    hostile_server, dropped_streams_log, monkeypatch
):
    (handler,) = hostile_server.conn_handlers
    monkeypatch.setattr(handler._dropped_stream_log, "last_logged", -math.inf)
    monkeypatch.setattr(handler._dropped_stream_log, "not_logged", 0)
    for _ in range(3):  # a flood of incomplete streams must not flood the log
        handler._log_dropped_stream("peer", IncompleteStreamError("forward of expert.0: cut short"))
    assert dropped_streams_log.levels == [logging.INFO, logging.DEBUG, logging.DEBUG]
    monkeypatch.setattr(handler._dropped_stream_log, "last_logged", -math.inf)  # the interval has passed
    handler._log_dropped_stream("peer", IncompleteStreamError("forward of expert.0: cut short"))
    assert dropped_streams_log.levels[-1] == logging.INFO
    assert "(2 more since the last such message)" in dropped_streams_log.messages[-1]
