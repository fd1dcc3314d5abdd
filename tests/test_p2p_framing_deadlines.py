"""Frame reads with a deadline: a cancellation is never lost, a stalled frame ends with FramingError."""

import asyncio

import pytest

from hivemind.p2p import framing
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(30)


async def test_a_cancellation_that_arrives_with_the_frames_last_bytes_is_not_lost():
    frame = framing.encode_frame(test_pb2.TestRequest(number=5))
    for split in range(1, len(frame)):  # cut inside the header and inside the payload
        reader = asyncio.StreamReader()
        reader.feed_data(frame[:split])
        task = asyncio.create_task(framing.receive_protobuf(test_pb2.TestRequest, reader))
        for _ in range(3):
            await asyncio.sleep(0)  # the read now waits for the rest of the frame
        reader.feed_data(frame[split:])
        task.cancel()  # in the same step: the read can finish and be cancelled at once
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_frame_stalled_past_its_deadline_raises_framing_error(monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.1)
    reader = asyncio.StreamReader()
    reader.feed_data(framing.encode_frame(test_pb2.TestRequest(number=5))[:4])
    with pytest.raises(framing.FramingError, match="unfinished"):
        await asyncio.wait_for(framing.receive_protobuf(test_pb2.TestRequest, reader), 10)
