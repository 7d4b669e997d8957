"""Reading nerdctl/ctr-remote record files (`estargz.md` §8.4) into the list of paths to prioritize."""
from __future__ import annotations

import json
import posixpath
from pathlib import Path

from .errors import RecordFileError


def normalize_record_path(path: str) -> str:
    """`foo/bar`, `/foo/bar`, `./foo/bar` and `../foo/bar` all name `foo/bar` inside a layer."""
    return posixpath.normpath("/" + path).lstrip("/")


def parse_record(text: str, source: str = "record file") -> list[str]:
    """Paths of whitespace-separated JSON objects, in file order, first occurrence kept.

    Only `path` is used; `manifestDigest` and `layerIndex` are ignored as `convert` applies the
    same list to every layer. The root itself (`/`) prioritizes nothing and is dropped.
    """
    decoder = json.JSONDecoder()
    paths: list[str] = []
    seen: set[str] = set()
    pos = 0
    n = len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return paths
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise RecordFileError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        line = text.count("\n", 0, pos) + 1
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
            raise RecordFileError(f'{source}: line {line}: expected an object with a string "path"')
        path = normalize_record_path(obj["path"])
        if path and path not in seen:
            seen.add(path)
            paths.append(path)
        pos = end


def read_record_file(path: Path | str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordFileError(f"cannot read record file {path}: {exc}") from None
    return parse_record(text, str(path))
