"""A search whose DHT calls hang (a loaded or partitioned DHT) ends at its step's deadline with the usual reasons.

A lookup or a declaration store may take up to dht_call_timeout (at least 5 s). One that began just before the
deadline used to outlast it: the search then ended only at look_for_group's backstop, 2 request_timeouts + 1 s past
the deadline, with "matchmaking overran its deadline". DHT calls are now bounded by the deadline too (real p2pd
daemons and DHT processes on 127.0.0.1). Its error now also says that the DHT calls failed or ran out of time.
"""

import asyncio
import time

import pytest
from averaging_matchmaking_swarm import make_step, swarm_context

from hivemind.averaging.matchmaking import MatchmakingException

pytestmark = pytest.mark.timeout(60)

STEP_TIMEOUT = 2.0


@pytest.mark.parametrize("stuck_call", ["get_averagers", "declare_averager"])
async def test_a_search_whose_dht_calls_hang_ends_at_its_deadline_with_its_reasons(stuck_call):
    async with swarm_context("stuckdht") as swarm:
        peer = await swarm.add(min_matchmaking_time=1.0, request_timeout=0.5)

        async def stuck(*args, **kwargs):
            await asyncio.sleep(60)

        setattr(peer.matchmaking.group_key_manager, stuck_call, stuck)
        started = time.monotonic()
        with pytest.raises(MatchmakingException) as info:
            await asyncio.wait_for(peer.matchmaking.look_for_group(make_step(timeout=STEP_TIMEOUT)), 20)
        elapsed = time.monotonic() - started
    message = str(info.value)
    assert "before the deadline" in message and "overran" not in message, message
    # and the reasons name the DHT calls that ran out of time, not a search that found nobody
    assert "ran out of time" in message and "no other averagers were found" not in message, message
    assert elapsed < STEP_TIMEOUT + 0.5, f"the search ended {elapsed - STEP_TIMEOUT:.2f} s after its deadline"
