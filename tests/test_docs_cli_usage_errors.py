"""docs/moe.md says which hivemind-server mistakes are usage errors (exit 2, nothing started) and which stop the
start-up with a traceback (exit 1): each flag that the parser refuses must not be listed among the latter."""

import re
from pathlib import Path

import pytest

from hivemind.hivemind_cli.run_server import make_parser, parse_server_options

MOE_DOC = Path(__file__).resolve().parents[1] / "docs" / "moe.md"

# a flag the parser refuses, and a command line that shows it
USAGE_ERRORS = {
    "--custom_module_path": ["--num_experts", "1", "--custom_module_path", "/nonexistent/experts.py"],
    "--checkpoint_dir": ["--num_experts", "1", "--checkpoint_dir", "/nonexistent/checkpoints"],
    "--expert_pattern": ["--num_experts", "1", "--expert_pattern", "ffn.[0:x]"],
    "--expert_uids": ["--expert_uids", "ffn"],
    "--expert_cls": ["--num_experts", "1", "--expert_cls", "foo"],
    "--scheduler": ["--num_experts", "1", "--scheduler", "linear"],
    "--device": ["--num_experts", "1", "--device", "gpu"],
    "--clip_grad_norm": ["--num_experts", "1", "--clip_grad_norm", "0"],
    "--expiration": ["--num_experts", "1", "--update_period", "10", "--expiration", "5"],
    "--min_batch_size": ["--num_experts", "1", "--min_batch_size", "8", "--max_batch_size", "4"],
}


def passages():
    text = " ".join(MOE_DOC.read_text().split())
    start = text.index("What a wrong command line does:")
    traceback_start = text.index("Other mistakes stop the start-up with status 1", start)
    end = text.index("Ctrl-C while the server is still starting", traceback_start)
    return text[start:traceback_start], text[traceback_start:end]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flag", sorted(USAGE_ERRORS))
def test_usage_errors_are_documented_as_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as error:
        parse_server_options(make_parser(), USAGE_ERRORS[flag])
    assert error.value.code == 2 and flag in capsys.readouterr().err
    usage_errors, tracebacks = passages()
    assert not re.search(re.escape(f"`{flag}") + r"[ `]", tracebacks), f"docs/moe.md: {flag} is a usage error"
    assert f"`{flag}" in usage_errors, f"docs/moe.md does not list {flag} among the usage errors"
