"""P2P.create refuses numeric options of a wrong type before it starts p2pd, and p2pd's own refusals name the
P2P.create option instead of p2pd's flag (-idleTimeout, -persistentConnMaxMsgSize, -relayHopLimit, -id)."""

import math

import pytest

from hivemind.p2p import P2P, P2PDaemonError
from hivemind.p2p.daemon_process import describe_output_line


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(persistent_conn_max_msg_size="4194304"), TypeError, "persistent_conn_max_msg_size must be an int"),
        (dict(persistent_conn_max_msg_size=4e6), TypeError, "persistent_conn_max_msg_size must be an int"),
        (dict(persistent_conn_max_msg_size=0), ValueError, "persistent_conn_max_msg_size must be a positive"),
        (dict(startup_timeout="15"), TypeError, "startup_timeout must be a number of seconds"),
        (dict(startup_timeout=math.nan), ValueError, "startup_timeout must be a number of seconds"),
        (dict(idle_timeout=None), TypeError, "idle_timeout must be a number of seconds"),
    ],
    ids=["size-str", "size-float", "size-zero", "startup-str", "startup-nan", "idle-None"],
)
async def test_numeric_options_of_a_wrong_type_are_refused(options, error, message):
    # before: "'>' not supported between instances of 'int' and 'str'", p2pd's "invalid value "4000000.0" for flag
    # -persistentConnMaxMsgSize", "unsupported operand type(s) for +: 'float' and 'str'" (after starting p2pd)
    with pytest.raises(error, match=message):
        p2p = await P2P.create(**options)
        await p2p.shutdown()


@pytest.mark.timeout(30)
async def test_a_negative_idle_timeout_is_reported_under_the_option_name():
    with pytest.raises(P2PDaemonError) as error_info:
        await P2P.create(idle_timeout=-1)
    assert "idle_timeout must not be negative" in str(error_info.value), str(error_info.value)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("-persistentConnMaxMsgSize must be positive", "persistent_conn_max_msg_size must be positive"),
        ('invalid value "x" for flag -relayHopLimit', 'invalid value "x" for flag relay_hop_limit'),
        ("cannot read identity file (-id): read /x: is a directory", "identity_path"),
    ],
)
def test_more_flag_names_are_translated(line, expected):
    assert expected in describe_output_line(line)
