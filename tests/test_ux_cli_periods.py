"""The CLIs refuse periods and counts that would make them spin or serve nothing, naming the flag."""

import pytest

from hivemind.hivemind_cli import run_dht
from hivemind.hivemind_cli.run_server import make_parser, parse_server_options
from hivemind.utils.logging import use_hivemind_log_handler


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", ["0", "-5"])
def test_dht_refuses_non_positive_refresh_period(value, capsys):
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_dht.main(["--refresh_period", value])
    finally:  # (main moves hivemind's log handler to the root logger, as a CLI does, for the rest of this process)
        use_hivemind_log_handler("in_hivemind")
    assert exit_info.value.code == 2
    assert "--refresh_period" in capsys.readouterr().err


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--num_experts", "0"], "--num_experts"),
        (["--num_experts", "2", "--update_period", "0"], "--update_period"),
        (["--num_experts", "2", "--update_period", "-1"], "--update_period"),
        (["--num_experts", "2", "--stats_report_interval", "0"], "--stats_report_interval"),
    ],
)
def test_server_refuses_non_positive_counts_and_periods(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_server_options(make_parser(), flags)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.timeout(10)
def test_server_accepts_no_statistics_by_default():
    options = parse_server_options(make_parser(), ["--num_experts", "2"])
    assert options["stats_report_interval"] is None and options["update_period"] == 30
