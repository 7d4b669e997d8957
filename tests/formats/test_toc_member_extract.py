"""`_extract_toc_json`: the direct (header, then JSON) path and the tarfile path agree."""
from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from stargz_store.formats.errors import InvalidTocError, TocTooLargeError
from stargz_store.formats.toc_member import _extract_direct as _extract_toc_json_direct
from stargz_store.formats.toc_member import extract_toc_json as _extract_toc_json
from stargz_store.formats.toc import TOC_TAR_NAME


def _member(payload: bytes, *, name: str = TOC_TAR_NAME, fmt: int = tarfile.USTAR_FORMAT, pax: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax or {}) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(buf.getvalue())


def test_plain_member_is_extracted_directly():
    payload = b'{"version":1,"entries":[]}' * 1000
    member = _member(payload)
    assert _extract_toc_json_direct(member, 1 << 20) == payload
    assert _extract_toc_json(member, 1 << 20) == payload


def test_pax_member_takes_the_tarfile_path():
    payload = b'{"version":1,"entries":[]}'
    member = _member(payload, fmt=tarfile.PAX_FORMAT, pax={"comment": "x" * 100})
    assert _extract_toc_json_direct(member, 1 << 20) is None
    assert _extract_toc_json(member, 1 << 20) == payload


def test_wrong_name_and_oversize_still_fail():
    with pytest.raises(InvalidTocError):
        _extract_toc_json(_member(b"{}", name="other.json"), 1 << 20)
    with pytest.raises(TocTooLargeError):
        _extract_toc_json(_member(b"x" * 5000), 1000)


def test_truncated_member_is_not_accepted_directly():
    member = _member(b"y" * 100_000)
    assert _extract_toc_json_direct(member[: len(member) // 2], 1 << 20) is None
    with pytest.raises(InvalidTocError):
        _extract_toc_json(member[: len(member) // 2], 1 << 20)
