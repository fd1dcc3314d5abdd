"""The top-level package: its exports and the aliases kept for scripts written against hivemind <= 1.1.11."""

import subprocess
import sys

import pytest

import hivemind


def test_version_and_main_export():
    assert hivemind.__version__ == "1.2.0.dev0"
    assert hivemind.DHT is __import__("hivemind.dht", fromlist=["DHT"]).DHT


@pytest.mark.parametrize(
    "name, module",
    [
        ("get_dht_time", "hivemind.utils"),
        ("MPFuture", "hivemind.utils"),
        ("use_hivemind_log_handler", "hivemind.utils"),
        ("nested_flatten", "hivemind.utils"),
        ("P2P", "hivemind.p2p"),
        ("PeerID", "hivemind.p2p"),
        ("P2PHandlerError", "hivemind.p2p"),
        ("Float16Compression", "hivemind.compression"),
        ("serialize_torch_tensor", "hivemind.compression"),
    ],
)
def test_legacy_alias_is_the_same_object(name, module):
    assert getattr(hivemind, name) is getattr(__import__(module, fromlist=[name]), name)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        hivemind.no_such_name  # noqa: B018


def test_import_is_silent_and_does_not_load_torch():
    code = "import sys, hivemind; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
    assert result.stderr == ""


@pytest.mark.parametrize(
    "name, module",
    [
        ("DecentralizedAverager", "hivemind.averaging"),
        ("Optimizer", "hivemind.optim"),
        ("GradScaler", "hivemind.optim"),
        ("TrainingAverager", "hivemind.optim"),
        ("RemoteExpert", "hivemind.moe"),
        ("RemoteMixtureOfExperts", "hivemind.moe"),
        ("RemoteSwitchMixtureOfExperts", "hivemind.moe"),
        ("ModuleBackend", "hivemind.moe"),
        ("register_expert_class", "hivemind.moe"),
    ],
)
def test_capability_exports_are_the_same_objects(name, module):
    assert name in hivemind.__all__
    assert getattr(hivemind, name) is getattr(__import__(module, fromlist=[name]), name)


def test_capability_subpackages_resolve_as_attributes():
    assert hivemind.averaging.DecentralizedAverager is hivemind.DecentralizedAverager
    assert hivemind.optim.Optimizer is hivemind.Optimizer
    assert hivemind.moe.RemoteExpert is hivemind.RemoteExpert
