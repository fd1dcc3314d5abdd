"""The identity start-up lines read as the CLI contract quotes them."""

import logging

import pytest


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def p2p_log_lines():
    handler, p2p_logger = _Lines(), logging.getLogger("hivemind.p2p.p2p_daemon")
    p2p_logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        p2p_logger.removeHandler(handler)


@pytest.mark.timeout(30)
async def test_identity_lines_match_the_cli_contract(tmp_path, p2p_factory, p2p_log_lines):
    path = str(tmp_path / "identity.key")
    first = await p2p_factory(identity_path=path)
    assert f"Generating new identity to be saved in `{path}`" in p2p_log_lines
    initial_peers = await (await p2p_factory()).get_visible_maddrs()
    await first.shutdown()
    await p2p_factory(identity_path=path, initial_peers=initial_peers)
    assert f"Checking that identity from `{path}` is not used by other peers" in p2p_log_lines
