"""trusted_relays are the relays this peer reserves slots on, so they need use_auto_relay=True and use_relay=True;
without them the start fails at once naming those options (before: p2pd's 'trusted_relays requires -autoRelay=1',
a flag the user never passed)."""

import pytest

from hivemind.p2p import P2P, P2PDaemonError

pytestmark = pytest.mark.timeout(30)

RELAY = "/ip4/127.0.0.1/tcp/31337/p2p/QmTqYRN8kAWrRWL5uSYAUKStuztgmxGBc5EfJoysuR2jVa"


@pytest.mark.parametrize(
    "options, missing",
    [
        (dict(use_auto_relay=False), "use_auto_relay"),
        (dict(use_auto_relay=True, use_relay=False), "use_relay"),
    ],
)
async def test_trusted_relays_without_auto_relay_name_the_missing_option(options, missing):
    with pytest.raises(P2PDaemonError, match=f"trusted_relays requires {missing}=True") as info:
        await P2P.create(trusted_relays=[RELAY], **options)
    assert f"{missing}=1" not in str(info.value), "the value is shown as it is passed (before: use_auto_relay=1)"
