"""An identity_path that cannot be a key file (its directory is missing, or it is a directory) is refused with an
error that names the option and what to do, instead of a bare "[Errno 2] No such file or directory"."""

import pytest

from hivemind.p2p import P2P


@pytest.mark.timeout(30)
async def test_an_identity_path_in_a_missing_directory_says_to_create_it(tmp_path):
    path = tmp_path / "missing" / "identity.key"
    expected = rf"identity_path {path}.*directory {path.parent} does not exist.*mkdir"
    with pytest.raises(FileNotFoundError, match=expected):
        await P2P.create(identity_path=str(path))


@pytest.mark.timeout(30)
async def test_an_identity_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"identity_path {tmp_path} is a directory.*file"):
        await P2P.create(identity_path=str(tmp_path))


@pytest.mark.timeout(30)
async def test_an_identity_path_in_an_existing_directory_is_created(tmp_path, p2p_factory):
    path = tmp_path / "identity.key"
    first = await p2p_factory(identity_path=str(path))
    assert path.exists()
    await first.shutdown()
    second = await p2p_factory(identity_path=str(path))
    assert second.peer_id == first.peer_id
