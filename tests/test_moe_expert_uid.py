"""Expert uid and prefix grammar (ffn.3.14, ffn.3.) and split_uid."""

import pytest

from hivemind.moe.expert_uid import (
    FLAT_EXPERT,
    PREFIX_PATTERN,
    UID_DELIMITER,
    UID_PATTERN,
    ExpertInfo,
    is_valid_prefix,
    is_valid_uid,
    split_uid,
)
from hivemind.p2p import PeerID


@pytest.mark.parametrize("uid", ["ffn.0", "ffn.3.14", "expert.12.3", "my-type_1.0.0.7", "a.10"])
def test_valid_uids(uid):
    assert is_valid_uid(uid) and UID_PATTERN.fullmatch(uid)


@pytest.mark.parametrize(
    "uid", ["ffn", "ffn.", "ffn.01", "ffn.1.", ".1", "ffn..1", "ffn.-1", "ffn.1a", "ffn.1\n", "", "ffn. 1", 5, None]
)
def test_invalid_uids(uid):
    assert not is_valid_uid(uid)


@pytest.mark.parametrize("prefix", ["ffn.", "ffn.3.", "expert.12.0."])
def test_valid_prefixes(prefix):
    assert is_valid_prefix(prefix) and PREFIX_PATTERN.fullmatch(prefix)


@pytest.mark.parametrize("prefix", ["ffn", "ffn.3", "ffn.03.", ".", "ffn..", "ffn.3.\n", 3])
def test_invalid_prefixes(prefix):
    assert not is_valid_prefix(prefix)


def test_split_uid_separates_the_last_coordinate():
    assert split_uid("ffn.3.14") == ("ffn.3.", 14)
    assert split_uid("ffn.3.") == ("ffn.", 3)
    assert split_uid("ffn.0") == ("ffn.", 0)


@pytest.mark.parametrize("bad", ["ffn", "ffn.", "ffn.x", ".3"])
def test_split_uid_refuses_strings_without_a_coordinate(bad):
    with pytest.raises(ValueError, match="integer coordinate"):
        split_uid(bad)


def test_constants_and_expert_info():
    assert UID_DELIMITER == "." and FLAT_EXPERT == -1
    peer_id = PeerID.from_base58("QmTkFQf2PN5tMxy6pbwcKKWWKt8CMjfNaY4fxKU3V7StGN")
    info = ExpertInfo("ffn.1", peer_id)
    assert info == ExpertInfo(uid="ffn.1", peer_id=peer_id) and info.uid == "ffn.1" and info.peer_id == peer_id
