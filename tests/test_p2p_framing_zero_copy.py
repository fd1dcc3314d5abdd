"""Bulk bytes cross the shared-memory pipe with one copy each way: a read-only view that the pipe cannot take at once
is referenced instead of copied, and a payload whose bytes are already in the ring gets one buffer of its size."""

import asyncio
import os
import sys

import pytest
from test_p2p_shm_pipe import RECORD, pipe_pair
from unix_socket_pair import LOOPS, run_in_loop

from hivemind.p2p.p2p_daemon_bindings import streams

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared-memory pipes are Linux-only"),
]

RING = 4096


async def _receive_everything(daemon, total: int) -> bytes:
    received = bytearray()
    while len(received) < total:
        kind, value = await daemon.record()
        assert kind == b"D"
        received += await daemon.receive(value)
    return bytes(received)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_read_only_view_waiting_for_ring_space_is_referenced_and_a_writable_one_copied(loop_kind, tmp_path):
    async def main():
        async with pipe_pair(tmp_path, ring_size=RING) as (reader, writer, daemon):
            stable = bytearray(os.urandom(3 * RING))  # the ring takes RING bytes of it, the rest waits
            reusable = bytearray(os.urandom(RING))
            writer.write(memoryview(stable).toreadonly())
            writer.write(memoryview(reusable))
            original_reusable = bytes(reusable)
            # after write() returned: the owner of the read-only view promised not to do this, so what arrives shows
            # whether the pipe copied it; a writable buffer may be reused at once and must arrive as it was
            stable[-100:] = b"r" * 100
            reusable[:] = b"w" * RING
            received = await _receive_everything(daemon, 4 * RING)
            assert received[: 3 * RING] == bytes(stable), "the read-only view was copied"
            assert received[3 * RING :] == original_reusable, "the writable buffer was not copied"

    run_in_loop(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_payload_already_in_the_ring_gets_one_buffer_of_its_size(loop_kind, tmp_path, monkeypatch):
    allocations = []
    uninitialized = streams._uninitialized

    def recording(size: int) -> memoryview:
        allocations.append(size)
        return uninitialized(size)

    monkeypatch.setattr(streams, "_uninitialized", recording)

    async def main():
        async with pipe_pair(tmp_path, ring_size=1 << 20) as (reader, writer, daemon):
            payload = os.urandom(600_000)
            reading = asyncio.ensure_future(reader.read_payload(len(payload)))
            await asyncio.sleep(0.01)  # the read waits for bytes (with no buffer of the announced size yet)
            assert max(allocations, default=0) < streams.GROWING_BUFFER_START_BYTES
            daemon.send(payload)
            received = await asyncio.wait_for(reading, 5)
            assert received == payload and isinstance(received, memoryview) and not received.readonly
            assert sorted(allocations)[-1] == len(payload) and sum(allocations) == len(payload)
            daemon.writer.write(RECORD.pack(b"E", 0))

    run_in_loop(loop_kind, main)
