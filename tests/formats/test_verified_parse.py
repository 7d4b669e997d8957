"""`layer_toc.verified_parse`: a TOC is hashed (on another thread when large) while it is parsed;
nothing parsed comes back unless the digest matched, and a mismatch is the error reported even
when the bytes do not parse either."""
from __future__ import annotations

import hashlib

import pytest

from stargz_store.formats.errors import DigestMismatchError, InvalidTocError
from stargz_store.formats.layer_toc import verified_parse


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


SMALL = b'{"entries": []}'
LARGE = b"x" * (3 << 20)  # above the size that hashes on a second thread


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["small", "large"])
def test_match_returns_parse_result_and_digest(data: bytes) -> None:
    parsed, digest = verified_parse(data, _digest(data), "TOC", len)
    assert (parsed, digest) == (len(data), _digest(data))


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["small", "large"])
def test_no_expected_digest_still_reports_it(data: bytes) -> None:
    assert verified_parse(data, None, "TOC", len)[1] == _digest(data)


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["small", "large"])
def test_mismatch_is_refused(data: bytes) -> None:
    other = _digest(b"something else")
    with pytest.raises(DigestMismatchError) as info:
        verified_parse(data, other, "TOC", len)
    assert other in str(info.value) and _digest(data) in str(info.value)


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["small", "large"])
def test_mismatch_wins_over_a_parse_error(data: bytes) -> None:
    def broken(_: bytes) -> None:
        raise InvalidTocError("not JSON")

    with pytest.raises(DigestMismatchError):
        verified_parse(data, _digest(b"another"), "TOC", broken)
    with pytest.raises(InvalidTocError):  # with the right digest, the parse error stands
        verified_parse(data, _digest(data), "TOC", broken)
