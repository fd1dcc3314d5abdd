"""hivemind-server --config FILE: lists written as YAML block lists (one '- item' line each) as well as [a, b]."""

import textwrap

import pytest

from hivemind.hivemind_cli.run_server import make_parser, parse_server_options


@pytest.mark.timeout(30)
def test_yaml_block_lists_are_lists(tmp_path):
    config = tmp_path / "server.yml"
    config.write_text(
        textwrap.dedent(
            """
            # a server of two experts
            expert_uids:
              - ffn.0
              - "ffn.1"
            host_maddrs:
            - /ip4/127.0.0.1/tcp/0
            hidden_dim: 8
            initial_peers: [/ip4/127.0.0.1/tcp/5/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z]
            """
        )
    )
    options = parse_server_options(make_parser(), ["--config", str(config)])
    assert options["expert_uids"] == ["ffn.0", "ffn.1"]
    assert options["host_maddrs"] == ["/ip4/127.0.0.1/tcp/0"]
    assert options["hidden_dim"] == 8
    assert options["initial_peers"] == ["/ip4/127.0.0.1/tcp/5/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"]


@pytest.mark.timeout(30)
def test_a_list_item_without_a_key_is_a_usage_error_naming_the_line(tmp_path, capsys):
    config = tmp_path / "server.yml"
    config.write_text("num_experts: 1\n- ffn.0\n")
    with pytest.raises(SystemExit) as error:
        parse_server_options(make_parser(), ["--config", str(config)])
    assert error.value.code == 2
    assert "- ffn.0" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_comments_after_a_block_list_key_and_its_items_are_comments(tmp_path):
    config = tmp_path / "server.yml"
    config.write_text(
        textwrap.dedent(
            """
            expert_uids:  # the experts of this server
              - ffn.0   # the first one
              - 'ffn.1' # the second one
            hidden_dim: 8  # small
            """
        )
    )
    options = parse_server_options(make_parser(), ["--config", str(config)])
    assert options["expert_uids"] == ["ffn.0", "ffn.1"]
    assert options["hidden_dim"] == 8
