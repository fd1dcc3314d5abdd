"""DirectStreamReader.read_payload takes memory only for bytes that arrived, whatever length was announced."""

import asyncio
import os
import tracemalloc

import psutil
import pytest
from unix_socket_pair import LOOPS, connected_pair, run_in_loop

from hivemind.p2p.p2p_daemon_bindings import streams

pytestmark = pytest.mark.timeout(60)

MiB, GiB = 1024**2, 1024**3


def rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_lazily_mapped_and_grown_payloads_arrive_intact(loop_kind, tmp_path):
    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((_, client_writer), (reader, _)):
            payloads = [os.urandom(streams.LAZY_MAPPING_MIN_BYTES + 3), os.urandom(5 * MiB + 1), os.urandom(70_000)]
            for payload in payloads:
                client_writer.write(payload)
            drain = asyncio.ensure_future(client_writer.drain())
            mapped = await reader.read_payload(len(payloads[0]))
            assert isinstance(mapped, memoryview) and mapped == payloads[0]
            for payload in payloads[1:]:
                assert await reader.read_payload(len(payload)) == payload
            await drain

    run_in_loop(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("announced", [GiB, 20 * MiB], ids=["mapped", "grown"])
def test_partly_sent_payload_takes_memory_only_for_what_arrived(loop_kind, announced, tmp_path):
    sent = 3 * MiB

    async def scenario():
        async with connected_pair(str(tmp_path / "s.sock")) as ((_, client_writer), (reader, _)):
            arrived = asyncio.Event()
            data_received = reader._direct_data_received

            def counting_data_received(nbytes: int) -> None:
                data_received(nbytes)
                if reader._direct_filled == sent:
                    arrived.set()

            reader._direct_data_received = counting_data_received
            # RSS alone misses a buffer of the announced size: its untouched pages are not resident, and freed heap
            # memory of earlier tests in this process is reused; Python's own allocations count every byte asked for
            data = os.urandom(sent)  # the sender's own bytes are not the reader's memory
            tracemalloc.start()
            try:
                before, traced_before = rss(), tracemalloc.get_traced_memory()[0]
                read = asyncio.ensure_future(reader.read_payload(announced))
                client_writer.write(data)
                await client_writer.drain()
                await arrived.wait()
                growth = max(rss() - before, tracemalloc.get_traced_memory()[0] - traced_before)
            finally:
                tracemalloc.stop()
            # 8 MiB of slack: other threads of a test worker move its RSS by a few MiB (10.8 MiB was seen under load);
            # the smallest buffer this must catch, the 20 MiB one announced, would still exceed the bound
            assert growth < 2 * sent + 8 * MiB, f"{sent / MiB} MiB arrived, {growth / MiB:.1f} MiB taken"
            client_writer.close()
            with pytest.raises(asyncio.IncompleteReadError) as error:
                await read
            assert len(error.value.partial) == sent and error.value.expected == announced

    run_in_loop(loop_kind, scenario)
