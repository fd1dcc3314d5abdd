"""dht.store(..., expiration_time=60), a duration where an absolute DHT time is expected, warns instead of silently
storing nothing."""

import pytest

from hivemind.dht import DHT
from hivemind.utils import get_dht_time


@pytest.mark.timeout(30)
def test_store_with_a_duration_as_expiration_time_warns(hivemind_warnings):
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
        assert dht.store("ux_key", "value", expiration_time=get_dht_time() + 60)  # right: no warning
        assert not dht.store("ux_key_2", "value", expiration_time=60)  # a duration: stores nothing, as before
        assert dht.get("ux_key_2") is None
    warnings = [message for message in hivemind_warnings if "expiration_time" in message]
    assert len(warnings) == 1, warnings
    assert "store('ux_key_2'): expiration_time=60 is long past" in warnings[0]
    assert "hivemind.utils.get_dht_time() + <seconds>" in warnings[0]
