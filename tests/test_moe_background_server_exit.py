"""background_server names the exit code of a server process that died before it started: its pipe closes a moment
before the kernel has its exit status, and the code was read at once ("exited with code None" in ~1 run in 3)."""

import os

import pytest

import hivemind.moe.server.server as server_module


def _dies_at_once(*args, **kwargs):
    os._exit(7)  # e.g. killed by the OOM killer before it could report an error


@pytest.mark.timeout(60)
def test_background_server_that_died_before_starting_reports_its_exit_code(monkeypatch):
    monkeypatch.setattr(server_module, "_serve_in_background", _dies_at_once)  # the process is forked from here
    for _ in range(10):
        with pytest.raises(RuntimeError, match=r"exited with code 7 before it started"):
            with server_module.background_server():
                pass
