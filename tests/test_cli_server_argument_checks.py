"""hivemind-server refuses flags that cannot work with a usage error (exit 2) before anything starts, instead of a
traceback once its DHT has started (expert pattern, uids, files) or once the experts are built (schedule, clipping)."""

import pytest

from hivemind.hivemind_cli.run_server import make_parser, parse_server_options


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_experts", "1", "--expert_pattern", "ffn.[0:x]"], "--expert_pattern 'ffn.[0:x]': block '[0:x]'"),
        (["--num_experts", "1", "--expert_pattern", "ffn.[5:2]"], "--expert_pattern 'ffn.[5:2]': range [5:2] is"),
        (["--expert_uids", "ffn.0", "ffn"], "--expert_uids: 'ffn' is not a valid expert uid"),
        (["--num_experts", "1", "--custom_module_path", "/nonexistent/experts.py"], "--custom_module_path"),
        (["--num_experts", "1", "--checkpoint_dir", "/nonexistent/checkpoints"], "mkdir -p /nonexistent/checkpoints"),
        (["--num_experts", "1", "--device", "gpu"], "--device 'gpu' is not a torch device (e.g. cpu, cuda, cuda:1)"),
        (["--num_experts", "1", "--clip_grad_norm", "-1"], "--clip_grad_norm must be a positive number"),
        (["--num_experts", "1", "--clip_grad_norm", "nan"], "--clip_grad_norm must be a positive number"),
        (["--num_experts", "1", "--scheduler", "linear"], "--scheduler linear needs --num_warmup_steps and"),
        (
            ["--num_experts", "1", "--scheduler", "linear", "--num_warmup_steps", "-5", "--num_training_steps", "10"],
            "need 0 <= --num_warmup_steps <= --num_training_steps",
        ),
    ],
    ids=[
        "pattern-block",
        "pattern-range",
        "uid",
        "module",
        "checkpoints",
        "device",
        "clip",
        "clip-nan",
        "linear",
        "warmup",
    ],  # fmt: skip
)
def test_unworkable_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as error:
        parse_server_options(make_parser(), flags)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_workable_flags_pass(tmp_path):
    flags = ["--num_experts", "2", "--expert_pattern", "ffn.[0:4].[0:4]", "--checkpoint_dir", str(tmp_path)]
    flags += ["--scheduler", "linear", "--num_warmup_steps", "0", "--num_training_steps", "10"]
    flags += ["--clip_grad_norm", "1"]
    options = parse_server_options(make_parser(), flags)
    assert options["expert_pattern"] == "ffn.[0:4].[0:4]" and options["clip_grad_norm"] == 1.0


CUSTOM_EXPERTS = """
import torch
from hivemind.moe.server.layers.custom_experts import register_expert_class


@register_expert_class("{name}", lambda batch_size, hid_dim: torch.empty((batch_size, hid_dim)))
class Custom(torch.nn.Linear):
    def __init__(self, hid_dim):
        super().__init__(hid_dim, hid_dim)
"""


def test_an_expert_class_that_the_custom_module_does_not_register_is_a_usage_error(tmp_path, capsys):
    # it stopped Server.create with an AssertionError traceback (the file was loaded only there)
    path = tmp_path / "custom_experts.py"
    path.write_text(CUSTOM_EXPERTS.format(name="argcheck_custom"))
    with pytest.raises(SystemExit) as error:
        parse_server_options(
            make_parser(), ["--num_experts", "1", "--expert_cls", "foo", "--custom_module_path", str(path)]
        )
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert f"--expert_cls 'foo' is neither a built-in expert class nor one that {path} registers" in err, err
    assert "argcheck_custom, det_dropout, ffn" in err, err
    # the class it registers passes (and the file is not run twice when the server loads it)
    flags = ["--num_experts", "1", "--expert_cls", "argcheck_custom", "--custom_module_path", str(path)]
    assert parse_server_options(make_parser(), flags)["expert_cls"] == "argcheck_custom"
