"""A get whose search fails leaves nothing behind in the node's bookkeeping of running gets.

Before, each key of a failed search (e.g. an invalid beam_size) kept an empty entry in ``DHTNode._pending_gets`` until
a later successful get of that very key: a long-running node that sees failing gets of ever new keys grew forever.
"""

import pytest

from hivemind.dht.node import DHTNode

pytestmark = pytest.mark.timeout(60)


async def test_failed_gets_of_many_keys_leave_no_pending_entries():
    first = await DHTNode.create()
    second = await DHTNode.create(initial_peers=[str(maddr) for maddr in await first.get_visible_maddrs()])
    try:
        for attempt in range(20):
            keys = [f"failing_key_{attempt}_{index}" for index in range(5)]
            with pytest.raises(ValueError, match="beam_size"):
                await second.get_many(keys, beam_size=-1)
        assert len(second._pending_gets) == 0
        assert await second.get("failing_key_0_0") is None  # and gets of those keys still work
        assert len(second._pending_gets) == 0
    finally:
        await second.shutdown()
        await first.shutdown()
