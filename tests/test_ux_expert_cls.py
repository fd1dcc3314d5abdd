"""An unknown expert class is refused with a message naming the flag and the known classes."""

import pytest

from hivemind.moe.server import Server


@pytest.mark.timeout(10)
def test_unknown_expert_cls_names_flag_and_known_classes():
    with pytest.raises(AssertionError) as error_info:
        Server.create(num_experts=1, expert_cls="no_such_expert", hidden_dim=4, start=False)
    message = str(error_info.value)
    assert "--expert_cls" in message and "'no_such_expert'" in message
    assert "'ffn'" in message and "'transformer'" in message
