"""hivemind-server refuses numeric flags that cannot work with a usage error (exit 2) instead of a broken server."""

import pytest

from hivemind.hivemind_cli.run_server import make_parser, parse_server_options


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--update_period", "30", "--expiration", "10"], "--expiration 10.0 must be above --update_period 30.0"),
        (["--update_period", "5", "--expiration", "5"], "expire before they are renewed"),
        (["--min_batch_size", "0"], "--min_batch_size must be at least 1"),
        (["--max_batch_size", "0"], "--max_batch_size must be at least 1"),
        (["--min_batch_size", "8", "--max_batch_size", "4"], "--min_batch_size 8 is above --max_batch_size 4"),
        (["--num_handlers", "0"], "--num_handlers must be at least 1"),
        (["--hidden_dim", "0"], "--hidden_dim must be at least 1"),
    ],
    ids=["expiration-below-period", "expiration-equal-period", "min0", "max0", "min-over-max", "handlers0", "hidden0"],
)
def test_unworkable_numeric_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as error:
        parse_server_options(make_parser(), ["--num_experts", "1", *flags])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_expiration_above_the_update_period_is_accepted():
    options = parse_server_options(make_parser(), ["--num_experts", "1", "--update_period", "5", "--expiration", "12"])
    assert (options["update_period"], options["expiration"]) == (5, 12)
