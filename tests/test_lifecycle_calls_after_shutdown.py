"""Methods of a DHT called after its shutdown() fail at once and say that the DHT has ended."""

import pytest

from hivemind.dht import DHT
from hivemind.dht.validation import RecordValidatorBase


class _AcceptAll(RecordValidatorBase):
    def validate(self, record) -> bool:
        return True


@pytest.mark.timeout(30)
def test_add_validators_after_shutdown_says_the_dht_has_ended_not_that_it_has_not_started():
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dht.add_validators([_AcceptAll()])
    dht.shutdown()
    with pytest.raises(RuntimeError) as error:
        dht.add_validators([_AcceptAll()])
    assert "has ended" in str(error.value) and "create a new DHT" in str(error.value), error.value
    assert "before" not in str(error.value), error.value


@pytest.mark.timeout(10)
def test_add_validators_before_start_still_says_so():
    dht = DHT(start=False)
    with pytest.raises(RuntimeError, match="before the DHT process has started"):
        dht.add_validators([_AcceptAll()])
