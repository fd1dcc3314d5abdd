"""The DHT process's socket for other processes: a long TMPDIR and a socket that cannot be opened."""

import os
import tempfile

import pytest

import hivemind
import hivemind.dht.dht as dht_module


@pytest.mark.timeout(30)
def test_a_dht_starts_when_the_temporary_directory_path_is_too_long_for_a_socket(tmp_path, monkeypatch):
    long_directory = tmp_path / ("x" * 110)  # a Unix socket address holds at most 107 bytes
    long_directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_directory))
    dht = hivemind.DHT(start=True)  # before: ChannelClosedError, "the DHT process ended before answering"
    try:
        assert dht.store("key", "value", hivemind.get_dht_time() + 30)
        assert dht.get("key", latest=True).value == "value"
        assert len(os.fsencode(dht._socket_address)) <= 103
    finally:
        dht.shutdown()


@pytest.mark.timeout(30)
def test_a_socket_that_cannot_be_opened_fails_start_up_with_its_reason(monkeypatch):
    monkeypatch.setattr(dht_module, "_socket_path", lambda name: f"/nonexistent-directory/{name}")
    with pytest.raises(FileNotFoundError):  # before: ChannelClosedError without the reason
        hivemind.DHT(start=True)
