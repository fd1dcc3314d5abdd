"""An initial peer without a peer id to join (no /p2p/ part, or a relay address that ends with /p2p-circuit) is
refused with an error that says so and what to pass, not with an internal error (it quoted
AttributeError("'NoneType' object has no attribute 'rstrip'"))."""

import pytest

from hivemind.dht import DHT
from hivemind.dht.node import peer_id_from_maddr

pytestmark = pytest.mark.timeout(30)

RELAY_ID = "QmXxrcCsjcvghbGE4Rq9oaEjDBUChLoNwMsKbqwyRVuGez"


@pytest.mark.parametrize(
    "maddr, says",
    [
        ("/ip4/127.0.0.1/tcp/31337", "must end with /p2p/<peer id>: "),
        (f"/ip4/127.0.0.1/tcp/31337/p2p/{RELAY_ID}/p2p-circuit", "must end with /p2p/<peer id> after /p2p-circuit"),
    ],
)
def test_an_initial_peer_without_a_peer_id_is_named_with_what_to_pass(maddr, says):
    for refuse in (lambda: peer_id_from_maddr(maddr), lambda: DHT(initial_peers=[maddr], start=True)):
        with pytest.raises(ValueError) as info:
            refuse()
        message = str(info.value)
        assert maddr in message and says in message, message
        assert "get_visible_maddrs()" in message, message
        assert "Error(" not in message, message  # before: AttributeError("'NoneType' object has no attribute ...")
